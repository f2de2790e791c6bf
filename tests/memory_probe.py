"""One rank of a 2-process CPU run that reports what it holds, for tests/test_memory_sharding.py.

    python -m torch.distributed.run --nproc-per-node=2 --standalone -m tests.memory_probe OUT_DIR OVERRIDE...

Each rank composes the overrides, plans and trains through qforge's own run path (trainer.run.train: the
tiny model loaded by its quant backend, the adapter attached, the strategy wrapped by the HF Trainer and
accelerate / DeepSpeed), and after the second optimizer step writes OUT_DIR/rank<r>.json: the bytes of its
parameter storage (trainable and frozen; FSDP2 local shards, ZeRO-3 partitions, each storage counted once),
of its optimizer state, and of the optimizer's own fp32 copies of the parameters (DeepSpeed's master copy).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Set

PROBE_STEP = 2


def _storage_bytes(tensor: Any, seen: Set[int]) -> int:
    """Bytes of the memory behind a tensor on this rank, each storage once."""
    from torch.distributed.tensor import DTensor

    partition = getattr(tensor, "ds_tensor", None)
    if partition is not None:
        # ZeRO-3: this rank's partition, and the whole tensor as well where DeepSpeed keeps a small parameter
        # gathered for the whole run (stage3_param_persistence_threshold); otherwise the parameter is empty.
        whole = _storage_bytes(tensor.data, seen) if tensor.data.numel() > 0 else 0
        return whole + _storage_bytes(partition, seen)
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen or storage.nbytes() == 0:
        return 0
    seen.add(storage.data_ptr())
    return int(storage.nbytes())


def _innermost(optimizer: Any) -> Any:
    """The torch optimizer that holds the state: through accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "state_dict_type"):
        inner = optimizer.optimizer
        if inner is optimizer:
            break
        optimizer = inner
    return optimizer


def measure(model: Any, optimizer: Any) -> Dict[str, int]:
    seen: Set[int] = set()
    params = {id(p) for p in model.parameters()}
    trainable = frozen = 0
    for p in model.parameters():
        nbytes = _storage_bytes(p, seen)
        if p.requires_grad:
            trainable += nbytes
        else:
            frozen += nbytes
    inner = _innermost(optimizer)
    state = master = 0
    state_seen: Set[int] = set()
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) not in params:  # the optimizer steps copies of the parameters: DeepSpeed's fp32 partitions
                master += _storage_bytes(p, state_seen)
    for per_param in inner.state.values():
        for value in per_param.values():
            if hasattr(value, "untyped_storage") and value.dim() > 0:
                state += _storage_bytes(value, state_seen)
    return {"trainable_param_bytes": trainable, "frozen_param_bytes": frozen, "optimizer_state_bytes": state,
            "optimizer_master_bytes": master, "optimizer": type(inner).__name__}


def main() -> None:
    out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    from transformers import TrainerCallback

    from trainer import run
    from trainer.compose import compose
    from trainer.log import configure_logging
    from trainer.plan import build_plan

    configure_logging()
    rank = int(os.environ.get("RANK", "0"))
    cfg = compose(overrides)
    plan = build_plan(cfg, run_dir=str(out_dir / "run"))
    os.makedirs(plan.run_dir, exist_ok=True)

    class Probe(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                        **kwargs: Any) -> None:
            if state.global_step == PROBE_STEP:
                found = {"rank": rank, "world_size": plan.world_size, **measure(model, optimizer)}
                (out_dir / f"rank{rank}.json").write_text(json.dumps(found))

    run.train(plan, extra_callbacks=[Probe()])


if __name__ == "__main__":
    main()
