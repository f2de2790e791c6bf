"""The `qforge` console script: the same entry as `python train.py`, with conf/ found wherever installed."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from trainer.compose import conf_dir, register


def main() -> None:
    register()

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="train")
    def _main(cfg: DictConfig) -> None:
        from trainer.entry import run_entry

        run_entry(cfg)

    _main()
