"""The one command-line entry: `python train.py` and the `qforge` console script both run `main()`.

Hydra composes conf/ with the command line; its composition errors are turned into one qforge line here
(trainer/overrides.py), so a typo never prints a stack of Hydra internals or a harmful "+key" suggestion.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from trainer.compose import conf_dir, register


def main() -> None:
    register()

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
    def _main(cfg: DictConfig) -> None:
        from trainer.entry import run_entry

        run_entry(cfg)

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
