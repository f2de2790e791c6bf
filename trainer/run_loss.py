"""A run's train_loss across interruptions, and a resume that never trains past the end.

The Trainer's train_loss sums the step losses of *this* attempt only, so a resumed run reported something else
than the same run uninterrupted; a log-history average is not it either (the steps between the last logging step
and a checkpoint are logged nowhere), and on CPU process groups the Trainer logs rank 0's loss, not the ranks'
mean. Here every micro-batch loss the Trainer's training_step returns is summed, the ranks' sums are averaged
once per optimizer step (one scalar all-reduce), each checkpoint records the running sum, and a resumed attempt
starts from it: train_loss = (sum of every step's mean loss over the ranks) / steps, whatever was interrupted.

transformers 5.17-5.24 also trains one step too many when a run resumes from a checkpoint taken at its very
last step (the epoch loop has no step check before the first step of a resumed epoch): a run killed after its
final checkpoint but before metrics.json came back with 31 steps of a 30-step run. When the restored state is
already at max_steps, no step is trained: NothingLeftToTrain leaves the Trainer with the checkpoint's weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

LOSS_FILE = "qforge_loss.json"


class NothingLeftToTrain(Exception):
    """The resumed checkpoint is at the run's last step: the Trainer loaded it and trains nothing."""


def saved_loss_sum(checkpoint: Optional[str]) -> Optional[float]:
    if not checkpoint:
        return None
    path = Path(checkpoint) / LOSS_FILE
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["loss_sum"])


def loss_callback(resume_from: Optional[str]) -> Any:
    """A TrainerCallback; call `.attach(trainer)` once the Trainer exists. Goes before the completeness callback."""
    from transformers import TrainerCallback

    class RunLoss(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.restored = saved_loss_sum(resume_from)
            self.total = self.restored or 0.0
            self.pending: Any = 0.0  # this rank's micro-batch losses since the last optimizer step
            # The steps' mean losses not yet added to total: kept on the device, so no step ends waiting for the GPU
            # (trainer/step_syncs.py); read back where total is read (train_loss, on_save).
            self.unread: Any = None

        def attach(self, trainer: Any) -> None:
            step = trainer.training_step

            def training_step(*args: Any, **kwargs: Any) -> Any:
                loss = step(*args, **kwargs)
                self.pending = self.pending + loss.detach().float()
                return loss

            trainer.training_step = training_step

        def read(self) -> float:
            if self.unread is not None:
                self.total += float(self.unread.item())
                self.unread = None
            return self.total

        def train_loss(self, steps: int) -> float:
            return self.read() / steps if steps > 0 else float("nan")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if resume_from and self.restored is None:
                log.warning("%s holds no %s (an older checkpoint): train_loss covers this attempt only",
                            resume_from, LOSS_FILE)
            if resume_from and state.max_steps and state.global_step >= state.max_steps:
                raise NothingLeftToTrain(resume_from)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch
            import torch.distributed as dist

            step_loss = torch.as_tensor(self.pending, dtype=torch.float32, device=args.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(step_loss)  # collective: every rank ends every optimizer step
                step_loss /= dist.get_world_size()
            # float64 on the device: the running sum of many steps rounds no worse than the float it replaces
            step_loss = step_loss.double()
            self.unread = step_loss if self.unread is None else self.unread + step_loss
            self.pending = 0.0

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                (checkpoint / LOSS_FILE).write_text(json.dumps({"step": state.global_step, "loss_sum": self.read()}))

    return RunLoss()
