"""ddp: a full copy per GPU, gradients all-reduced (torch DistributedDataParallel through accelerate)."""

from __future__ import annotations

from typing import Any

from trainer.strategies.base import Strategy, StrategySpec


class DDP(Strategy):
    def configure(self, spec: StrategySpec, cfg: Any, device: str, compute_dtype: str, decoder_layer: str) -> None:
        adapters_only = cfg.peft.method.value not in ("full", "freeze")
        # With adapters every trainable parameter gets a gradient each step; searching for unused ones costs a
        # graph walk per step for nothing.
        spec.training_args = {"ddp_find_unused_parameters": not adapters_only, "ddp_backend": spec.dist_backend}


STRATEGY = DDP(name="ddp", summary="a full copy per GPU, gradients all-reduced", distributed=True)
