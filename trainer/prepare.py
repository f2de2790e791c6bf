"""`python -m trainer.prepare <overrides>`: compose, validate, plan and create the run dir, without launching.

slurm/train.sbatch runs this once when it was submitted by hand (`sbatch slurm/train.sbatch quant=bnb4 ...`):
it is then the job's launcher, and its ranks train from the plan it writes, as they do for a job submitted by
`python train.py launcher=slurm`. Exit codes and messages are train.py's (2: a rule refused the composition).
"""

from __future__ import annotations

import sys
from typing import List


def main(argv: List[str]) -> int:
    from trainer import inputs
    from trainer.compose import compose, conf_dir
    from trainer.errors import UserError
    from trainer.log import configure_logging
    from trainer.overrides import check_composed, explain
    from trainer.plan import build_plan
    from trainer.rundir import Composition, create
    from trainer.validate import validate

    configure_logging()
    try:
        cfg = compose(argv)
    except Exception as err:  # noqa: BLE001 - composition errors have no common base class
        message = explain(err, conf_dir())
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        check_composed(cfg, argv, {}, conf_dir())
        report = validate(cfg)
        report.print()
        if not report.ok:
            print(f"qforge: {len(report.errors)} rule(s) reject this composition; nothing was run.", file=sys.stderr)
            return 2
        plan = build_plan(cfg)
        plan.warnings = [v.line() for v in report.warnings]
        inputs.check(cfg, plan.run_dir, plan.data)
        create(plan, Composition.of(cfg, argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(plan.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
