"""Launchers: run a validated plan in this process, under torchrun, or on Slurm."""

from __future__ import annotations

from typing import Any, List

from trainer.plan import RunPlan


def launch(cfg: Any, plan: RunPlan, overrides: List[str]) -> None:
    name = cfg.launcher.name.value
    if name == "local":
        from launchers.local import run_local

        run_local(cfg, plan, overrides)
    elif name == "torchrun":
        from launchers.torchrun import run_torchrun

        run_torchrun(cfg, plan, overrides)
    else:
        from launchers.slurm import submit

        submit(cfg, plan, overrides)
