"""In-process launch: create the run dir, train, print where the outputs are."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, List

from trainer import rundir
from trainer.errors import UserError
from trainer.plan import RunPlan

log = logging.getLogger(__name__)


def run_local(cfg: Any, plan: RunPlan, overrides: List[str]) -> None:
    from trainer.run import train

    fresh = not Path(plan.run_dir).exists()
    rundir.create(plan.run_dir, cfg, overrides, plan.to_dict())
    handler = _log_to_file(plan.run_dir)
    log.info("run dir: %s", plan.run_dir)
    try:
        metrics = train(cfg, plan)
    except UserError:
        # Bad input found before the first checkpoint: a dir this run made holds nothing worth
        # keeping, and leaving it would only look like a crashed run to resume.
        if fresh and not any(Path(plan.run_dir, "checkpoints").glob("checkpoint-*")):
            logging.getLogger().removeHandler(handler)
            handler.close()
            shutil.rmtree(plan.run_dir, ignore_errors=True)
        raise
    summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("eval_loss_before", "eval_loss", "train_loss",
                                                           "tokens_per_second") if k in metrics)
    print(f"qforge: finished. {summary}\nqforge: outputs in {plan.run_dir}", file=sys.stderr)


def _log_to_file(run_dir: str) -> logging.Handler:
    handler = logging.FileHandler(f"{run_dir}/train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
