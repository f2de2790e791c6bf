"""Test-only TrainerCallbacks, plugged into real runs with `train.callbacks=[tests.probes:<name>]`.

The run itself writes nothing for tests; these observe it from the outside, through the same plug-in point a
user has (trainer/run.py `_plugged_in`): the trained model's logits on a fixed prompt, each rank's trainable
parameters, and what each rank process imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

FIXED_LOGITS_FILE = "final_logits.safetensors"
# A fixed probe: the trained model's logits on it are saved so a reloaded adapter can be checked.
FIXED_PROBE = "### Instruction:\nName three primary colors.\n\n### Response:\n"
# What a rank must never import: composing and validating are the launcher's (trainer/rank.py).
LAUNCHER_ONLY = ("hydra", "trainer.compose", "trainer.validate", "trainer.overrides", "trainer.entry",
                 "trainer.cli")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fixed_logits(plan: Any) -> Any:
    """At the end of training, every rank runs the probe (sharded weights need all of them); rank 0 saves."""
    from transformers import TrainerCallback

    class FixedLogits(TrainerCallback):  # type: ignore[misc]
        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                         processing_class: Any = None, **kwargs: Any) -> None:
            import torch
            from safetensors.torch import save_file

            ids = processing_class(FIXED_PROBE, return_tensors="pt")["input_ids"].to(args.device)
            was_training = model.training
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float().cpu()
            model.train(was_training)
            if state.is_world_process_zero:
                save_file({"input_ids": ids.cpu(), "logits": logits.contiguous()},
                          str(Path(plan.run_dir) / FIXED_LOGITS_FILE))

    return FixedLogits()


def rank_params(plan: Any) -> Any:
    """Each rank writes the sha256 of its trainable parameters after the last step (DDP keeps them equal)."""
    from transformers import TrainerCallback

    class RankParams(TrainerCallback):  # type: ignore[misc]
        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            digest = hashlib.sha256()
            count = 0
            for name, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    data = param.detach()
                    data = data.full_tensor() if hasattr(data, "full_tensor") else data
                    digest.update(name.encode() + data.float().cpu().numpy().tobytes())
                    count += 1
            (Path(plan.run_dir) / f"rank_params-{_rank()}.json").write_text(
                json.dumps({"rank": _rank(), "sha256": digest.hexdigest(), "tensors": count}))

    return RankParams()


def rank_imports(plan: Any) -> Any:
    """Each rank writes which launcher-only modules its process has imported by the time training starts."""
    from transformers import TrainerCallback

    class RankImports(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            imported = sorted(m for m in LAUNCHER_ONLY if m in sys.modules)
            (Path(plan.run_dir) / f"rank_imports-{_rank()}.json").write_text(
                json.dumps({"rank": _rank(), "argv": sys.argv, "imported": imported}))

    return RankImports()


def first_batch(plan: Any) -> Any:
    """Each rank writes the sha256 of the first training batch its dataloader yields (a fresh iterator over it:
    a streaming dataset restarts from its first row, so the run's own iteration is unchanged)."""
    from transformers import TrainerCallback

    class FirstBatch(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            batch = next(iter(train_dataloader))
            ids = batch["input_ids"].cpu().numpy()
            (Path(plan.run_dir) / f"first_batch-{_rank()}.json").write_text(
                json.dumps({"rank": _rank(), "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                            "shape": list(ids.shape)}))

    return FirstBatch()


def step_times(plan: Any) -> Any:
    """Each rank writes the wall time of every optimizer step (the GPU synchronised at both ends)."""
    import time

    from transformers import TrainerCallback

    def sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.started = 0.0
            self.seconds: list = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.started = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync()
            self.seconds.append(time.monotonic() - self.started)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            (Path(plan.run_dir) / f"step_times-{_rank()}.json").write_text(
                json.dumps({"rank": _rank(), "seconds": self.seconds}))

    return StepTimes()
