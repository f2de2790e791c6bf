"""What train.py and the `qforge` console script do with a composed config.

compose (Hydra, already done) -> check the command line -> validate -> plan -> check inputs -> launch. A
UserError becomes one line on stderr and a non-zero exit; no traceback reaches a user for input they can fix.
This is the only place that turns a composition into a launched run; ranks start from the plan (trainer/rank.py).
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

from trainer.errors import UserError
from trainer.log import configure_logging


def run_entry(cfg: Any) -> None:
    configure_logging()
    try:
        _run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def _run(cfg: Any) -> None:
    from trainer import inputs
    from trainer.plan import build_plan
    from trainer.rundir import Composition
    from trainer.validate import validate

    _check_command_line(cfg)
    if _hydra_multirun_dir() is not None and cfg.launcher.name.value == "slurm":
        # A -m sweep on Slurm: validate every combination, submit the legal ones as one job array, exit.
        from launchers.slurm_sweep import submit_sweep_from_hydra

        submit_sweep_from_hydra(cfg)
    report = validate(cfg)
    report.print()
    if not report.ok:
        print(f"qforge: {len(report.errors)} rule(s) reject this composition; nothing was run.", file=sys.stderr)
        sys.exit(2)

    plan = build_plan(cfg, run_dir=_hydra_multirun_dir())
    plan.warnings = [v.line() for v in report.warnings]
    inputs.check(cfg, plan.run_dir, plan.data)  # before anything is created or an earlier run is touched
    if cfg.dry_run:
        print(plan.render())
        return

    from launchers import launch

    launch(plan, Composition.of(cfg, _overrides()))


def _check_command_line(cfg: Any) -> None:
    """What Hydra composed but the schema does not have (a '+' key, an unknown experiment, ...)."""
    from hydra.core.hydra_config import HydraConfig

    from trainer.compose import conf_dir
    from trainer.overrides import check_composed

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    check_composed(cfg, list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices), conf_dir())


def _overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _hydra_multirun_dir() -> Optional[str]:
    """In a -m sweep each job gets the dir Hydra made for it under the sweep dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().runtime.output_dir)
    return None
