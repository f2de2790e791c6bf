"""Stop a run cleanly on a warning (preemption, walltime) or a Ctrl-C: checkpoint at a step boundary, then exit.

A stop is requested by the warning signal (launcher.slurm.signal's name, USR2 by default) delivered
to a rank, or by the file STOP_REQUEST in the run dir (slurm/train.sbatch touches it when Slurm sends
the signal to the batch script; a user may touch it by hand). At every optimizer step all ranks agree
(one all-reduce of a flag) so they stop at the same step; the Trainer saves a checkpoint; once it is
complete, rank 0 writes PREEMPTED and every rank exits 0. Requeueing is not done here: the sbatch
script owns it, so exactly one component requeues. Each attempt's first and last step and how many
steps it trained go to attempts.jsonl, which shows that no step is trained twice across requeues.

Ctrl-C (SIGINT) takes the same path without the requeue: the ranks stop at the next step, the checkpoint is
made complete, and RunInterrupted reaches the launcher, which prints one line with the resume command and exits
130. A second Ctrl-C (more than a second later: under torchrun the agent passes the first one on) stops at once;
the newest complete checkpoint stays the one a resume takes.
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
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
_REPEAT_GRACE_SECONDS = 1.0


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, handled: a complete checkpoint of `step` exists (step None: stopped before one was made)."""

    def __init__(self, step: Optional[int]) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step


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


def warning_signal(name: Optional[str]) -> Optional[signal.Signals]:
    return getattr(signal, f"SIG{name}", None) if name else None


def attempts(run_dir: str) -> list:
    path = Path(run_dir) / ATTEMPTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def preemption_callback(signal_to_stop: Optional[str], run_dir: str) -> Any:
    """signal_to_stop: the warning signal's name (the plan's launcher.preemption_signal), e.g. USR2."""
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):  # type: ignore[misc]
        """Must come after the checkpoint-completeness callback: it exits in on_save."""

        def __init__(self) -> None:
            self.signalled = False
            self.interrupted_at: Optional[float] = None
            self.stopping = False
            self.interrupting = False
            self.first_step = 0
            self.steps_trained = 0
            self.started = time.time()
            self.sig = warning_signal(signal_to_stop)

        def _on_signal(self, signum: int, frame: Any) -> None:
            self.signalled = True  # only a flag: the step boundary does the work

        def _on_interrupt(self, signum: int, frame: Any) -> None:
            now = time.monotonic()
            if self.interrupted_at is None:
                self.interrupted_at = now
                log.warning("Ctrl-C: checkpointing at the next step, then stopping (Ctrl-C again to stop at once)")
            elif now - self.interrupted_at > _REPEAT_GRACE_SECONDS:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The Trainer has loaded a resumed checkpoint's state by now: global_step is where we start.
            self.first_step = state.global_step
            if threading.current_thread() is threading.main_thread():
                if self.sig is not None:
                    signal.signal(self.sig, self._on_signal)
                signal.signal(signal.SIGINT, self._on_interrupt)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps_trained += 1
            if state.max_steps and state.global_step >= state.max_steps:
                return  # the last step: finishing costs less than a requeue
            preempt = self.signalled or (Path(run_dir) / STOP_REQUEST).exists()
            reasons = self._all_agree((1 if preempt else 0) | (2 if self.interrupted_at is not None else 0), args)
            if reasons:
                self.stopping = True
                self.interrupting = bool(reasons & 2)
                if not self.interrupting:
                    log.warning("stop requested: checkpointing at step %d, then exiting for requeue",
                                state.global_step)
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.stopping:
                return
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized()
            if distributed:
                dist.barrier()  # the checkpoint is complete on every rank (and marked by rank 0)
            if self.interrupting:
                if state.is_world_process_zero:
                    self._record(state.global_step, "interrupted")
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise RunInterrupted(state.global_step)
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
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)  # eval and saving: Ctrl-C stops at once
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
        def _all_agree(local: int, args: Any) -> int:
            """The reasons to stop (bit flags) of all ranks together, so all ranks stop at the same step."""
            import torch
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return local
            flags = torch.tensor([local & 1, (local >> 1) & 1], device=args.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            return int(flags[0].item()) | (int(flags[1].item()) << 1)

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
