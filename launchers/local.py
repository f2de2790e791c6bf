"""In-process launch: create the run dir, train, print where the outputs are."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from trainer import checkpoints, rundir
from trainer.errors import UserError
from trainer.log import log_to_file
from trainer.preemption import INTERRUPT_EXIT_CODE
from trainer.rundir import Composition
from trainer.specs import RunPlan

log = logging.getLogger(__name__)


def run_local(plan: RunPlan, composition: Composition) -> None:
    from trainer.run import train

    made = rundir.dirs_to_make(Path(plan.run_dir))
    rundir.create(plan, composition)
    handler = log_to_file(plan.run_dir)
    log.info("run dir: %s", plan.run_dir)
    try:
        metrics = train(plan)
    except UserError:
        # Bad input found before the first checkpoint: a dir this run made holds nothing worth
        # keeping, and leaving it would only look like a crashed run to resume.
        _remove_if_unused(made, plan.run_dir, handler)
        raise
    except KeyboardInterrupt:
        if newest_step(plan.run_dir) is None:
            _remove_if_unused(made, plan.run_dir, handler)
        print(interrupted_line(composition.overrides, plan.run_dir), file=sys.stderr)
        sys.exit(INTERRUPT_EXIT_CODE)
    summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("eval_loss_before", "eval_loss", "train_loss",
                                                           "tokens_per_second") if k in metrics)
    print(f"qforge: finished. {summary}\nqforge: outputs in {plan.run_dir}", file=sys.stderr)


def interrupted_line(overrides: List[str], run_dir: str) -> str:
    """What a Ctrl-C leaves: the step of the newest complete checkpoint and the command that resumes it."""
    step = newest_step(run_dir)
    if step is None:
        return "qforge: interrupted before the first checkpoint; there is nothing to resume."
    return (f"qforge: interrupted at step {step} (checkpoint-{step} is complete); resume with: "
            f"{resume_command(overrides, run_dir)}")


def resume_command(overrides: List[str], run_dir: str) -> str:
    """The command that continues this run: the same overrides, pinned to its run dir."""
    kept = [o for o in without_keys(overrides, ("run_dir", "train.resume"))]
    return " ".join(["python train.py", *map(shlex.quote, kept), shlex.quote(f"run_dir={run_dir}")])


def without_keys(overrides: List[str], keys: tuple) -> List[str]:
    """The overrides minus those that set one of `keys` (with or without a + / ++ / ~ prefix)."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0].strip() not in keys]


def newest_step(run_dir: str) -> Optional[int]:
    newest = checkpoints.newest_complete(checkpoints.checkpoint_dir(run_dir))
    return checkpoints.step_of(newest) if newest else None


def _remove_if_unused(made: List[Path], run_dir: str, handler: logging.Handler) -> None:
    if not made or any(Path(run_dir, "checkpoints").glob("checkpoint-*")):
        return
    logging.getLogger().removeHandler(handler)
    handler.close()
    rundir.remove_made(made)
