"""The one command-line entry: `python train.py` and the `qforge` console script both run `main()`.

Hydra composes conf/ with the command line; its composition errors are turned into one qforge line here
(trainer/overrides.py), so a typo never prints a stack of Hydra internals or a harmful "+key" suggestion.
"""

from __future__ import annotations

import os
import sys
from typing import List

import hydra
from omegaconf import DictConfig

from trainer.compose import conf_dir, register
from trainer.errors import UserError


def run_dir_from_hydra(argv: List[str]) -> List[str]:
    """`hydra.run.dir=X`, what a Hydra user types to pick the output dir, picks the run dir (run_dir=X).

    qforge makes each run dir itself, after validation (trainer/rundir.py), so Hydra's own run dir stays the
    working dir; the override is turned into run_dir before Hydra would create X for an illegal composition.
    """
    chosen = [a for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    if not chosen:
        return argv
    if any(a.lstrip("+~").startswith("run_dir=") for a in argv):
        raise UserError("hydra.run.dir and run_dir both pick the run dir; keep one of them (run_dir=...).")
    value = chosen[-1].split("=", 1)[1]
    return [a for a in argv if a not in chosen] + [f"run_dir={value}"]


def main() -> None:
    register()

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
    def _main(cfg: DictConfig) -> None:
        from trainer.entry import run_entry

        run_entry(cfg)

    try:
        sys.argv[1:] = run_dir_from_hydra(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    # Hydra re-raises instead of printing its own report, so composition errors can be translated below;
    # anything that is not one (a bug) still propagates with its traceback.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except Exception as err:  # noqa: BLE001 - composition errors have no common base class
        from trainer.overrides import explain

        message = explain(err, conf_dir())
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
