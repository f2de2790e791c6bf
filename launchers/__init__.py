"""Launchers: run a planned run in this process, under torchrun, or on Slurm.

A launcher gets the RunPlan and what the run dir records of the composition; it creates the run dir, writes
the plan into it, and starts the ranks, which read that plan (trainer/rank.py). Launchers never import the
entry point (trainer/entry.py, trainer/cli.py): the entry calls them, not the other way round.
"""

from __future__ import annotations

from trainer.rundir import Composition
from trainer.specs import RunPlan


def launch(plan: RunPlan, composition: Composition) -> None:
    if plan.launcher.name == "local":
        from launchers.local import run_local

        run_local(plan, composition)
    elif plan.launcher.name == "torchrun":
        from launchers.torchrun import run_torchrun

        run_torchrun(plan, composition)
    else:
        from launchers.slurm import submit

        submit(plan, composition)
