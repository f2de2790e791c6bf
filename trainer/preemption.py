"""Stop a run cleanly on a warning (preemption, walltime): checkpoint at a step boundary, exit 0.

A stop is requested by the warning signal (launcher.slurm.signal's name, USR2 by default) delivered
to a rank, or by the file STOP_REQUEST in the run dir (slurm/train.sbatch touches it when Slurm sends
the signal to the batch script; a user may touch it by hand). At every optimizer step all ranks agree
(one all-reduce of a flag) so they stop at the same step; the Trainer saves a checkpoint; once it is
complete, rank 0 writes PREEMPTED and every rank exits 0. Requeueing is not done here: the sbatch
script owns it, so exactly one component requeues. Each attempt's first and last step and how many
steps it trained go to attempts.jsonl, which shows that no step is trained twice across requeues.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

STOP_REQUEST = ".qforge_stop_request"
PREEMPTED = ".qforge_preempted"
ATTEMPTS = "attempts.jsonl"


# launcher.slurm.signal: SIGNAL[@SECONDS], as sbatch's --signal takes it (B: allowed, SIG optional).
SIGNAL_SPEC = re.compile(r"^(?:B:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?$")


def signal_name(spec: str) -> Optional[str]:
    """'USR2@120' or 'B:SIGUSR2@120' -> 'USR2'; None when Python does not know the signal."""
    match = SIGNAL_SPEC.match(spec.strip().upper())
    if not match:
        return None
    name = match.group(1)
    if name.isdigit():
        try:
            return signal.Signals(int(name)).name.removeprefix("SIG")
        except ValueError:
            return None
    return name if hasattr(signal, f"SIG{name}") else None


def signal_from_config(cfg: Any) -> Optional[signal.Signals]:
    name = signal_name(str(cfg.launcher.slurm.signal))
    return getattr(signal, f"SIG{name}", None) if name else None


def attempts(run_dir: str) -> list:
    path = Path(run_dir) / ATTEMPTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def preemption_callback(cfg: Any, run_dir: str) -> Any:
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):  # type: ignore[misc]
        """Must come after the checkpoint-completeness callback: it exits in on_save."""

        def __init__(self) -> None:
            self.signalled = False
            self.stopping = False
            self.first_step = 0
            self.steps_trained = 0
            self.started = time.time()
            self.sig = signal_from_config(cfg)

        def _on_signal(self, signum: int, frame: Any) -> None:
            self.signalled = True  # only a flag: the step boundary does the work

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The Trainer has loaded a resumed checkpoint's state by now: global_step is where we start.
            self.first_step = state.global_step
            if self.sig is not None and threading.current_thread() is threading.main_thread():
                signal.signal(self.sig, self._on_signal)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps_trained += 1
            if state.max_steps and state.global_step >= state.max_steps:
                return  # the last step: finishing costs less than a requeue
            if self._all_agree(self.signalled or (Path(run_dir) / STOP_REQUEST).exists(), args):
                log.warning("stop requested: checkpointing at step %d, then exiting for requeue", state.global_step)
                self.stopping = True
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.stopping:
                return
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized()
            if distributed:
                dist.barrier()  # the checkpoint is complete on every rank (and marked by rank 0)
            if state.is_world_process_zero:
                self._record(state.global_step, "preempted")
                marker = {"step": state.global_step, "checkpoint": f"checkpoint-{state.global_step}"}
                _write_atomic(Path(run_dir) / PREEMPTED, json.dumps(marker))
                _finish_wandb_preempted()
            if distributed:
                dist.barrier()
                dist.destroy_process_group()
            raise SystemExit(0)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and not self.stopping:
                self._record(state.global_step, "finished")

        def _record(self, last_step: int, ended: str) -> None:
            entry: Dict[str, Any] = {
                "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "first_step": self.first_step,
                "last_step": last_step,
                "steps_trained": self.steps_trained,
                "ended": ended,
                "seconds": round(time.time() - self.started, 1),
            }
            with open(Path(run_dir) / ATTEMPTS, "a") as f:
                f.write(json.dumps(entry) + "\n")

        @staticmethod
        def _all_agree(local: bool, args: Any) -> bool:
            """True on every rank if any rank wants to stop, so all ranks stop at the same step."""
            import torch
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return local
            flag = torch.tensor([1 if local else 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

    return PreemptionCallback()


def _finish_wandb_preempted() -> None:
    """Close the wandb run as preempting; the requeued job resumes it by the id in wandb_run_id."""
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    try:
        run.mark_preempting()
    except Exception:  # older wandb without it: finishing is what matters
        pass
    run.finish()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
