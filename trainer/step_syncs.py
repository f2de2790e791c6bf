"""No host-device sync at the end of a training step, so the CPU queues the optimizer and the next step's forward
while the GPU is still running the backward.

Profiled on one H200 (bench item a, Llama-3-8B shape, 8k tokens per step), the HF Trainer made the CPU wait for the
GPU three times after each backward: `torch.isnan(loss) or torch.isinf(loss)` (logging_nan_inf_filter), the
tokens-seen counter (`.item()` of a count on the GPU) and run_loss's `.item()`. The first wait was 70 ms, the
backward's backlog; after it the GPU sat idle for the ~55 ms of Python the optimizer step, callbacks and next batch
take, every step (83% of the step's wall time had a kernel running). Here:

- logging_nan_inf_filter is off (plan.training_args): a step whose loss is NaN or inf shows in the logged loss
  instead of being replaced by the running average, which hides a diverged run;
- on one process the tokens-seen count (packed rows or padded batches) is summed on the device and read back
  (`materialise`) only where someone reads it: steps that log, save, evaluate or stop, and the end of training.
  The counts are the Trainer's own (the attention mask's sum, else the ids that are not padding), so train_tokens
  and trainer_state.json are unchanged; several processes keep the Trainer's gather, a collective every step;
- run_loss keeps its running sum on the device for the same reason (trainer/run_loss.py).
"""

from __future__ import annotations

from typing import Any, List


class LazyTokenCount:
    """trainer._track_num_input_tokens on one process: the count stays on the device until it is read."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.pending: List[Any] = []

    def track(self, inputs: Any) -> None:
        import torch

        trainer = self.trainer
        name = getattr(trainer.model, "main_input_name", "input_ids")
        batch = inputs if hasattr(inputs, "get") else {}
        ids, mask = batch.get(name), batch.get("attention_mask")
        pad = getattr(trainer.processing_class, "pad_token_id", None)
        if ids is None or trainer.args.include_num_input_tokens_seen != "non_padding" or (mask is None and pad is None):
            self.materialise()
            type(trainer)._track_num_input_tokens(trainer, inputs)  # the Trainer's own count (and its warnings)
            return
        # what the Trainer counts: the attention mask of padded batches, else the ids that are not padding
        self.pending.append(mask.sum(dtype=torch.int64) if mask is not None else (ids != pad).sum(dtype=torch.int64))

    def materialise(self) -> None:
        """Add what is counted so far to trainer.state.num_input_tokens_seen (one sync)."""
        if self.pending:
            total, self.pending = sum(self.pending), []
            self.trainer.state.num_input_tokens_seen += int(total.item())


def install(trainer: Any, world_size: int) -> Any:
    """Put the lazy token count on a one-process Trainer; returns the callback that reads it back when needed."""
    from transformers import TrainerCallback

    counter = LazyTokenCount(trainer) if world_size == 1 else None
    if counter is not None:
        trainer._track_num_input_tokens = counter.track

    class ReadTokensWhenNeeded(TrainerCallback):  # type: ignore[misc]
        """DefaultFlowCallback (first in the list) has decided by on_step_end whether this step logs or saves."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # should_training_stop: DefaultFlowCallback's at max_steps, or preemption's
            if counter is not None and (control.should_log or control.should_save or control.should_evaluate
                                        or control.should_training_stop):
                counter.materialise()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if counter is not None:
                counter.materialise()

    return ReadTokensWhenNeeded()
