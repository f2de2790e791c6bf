"""What every strategy is: its facts, its plan-time config, and its run-time hooks.

A strategy (single, ddp, fsdp, zero2, zero3, zero3_offload) is one object. Its facts (does it need several
processes, does it shard weights, which speed paths it allows) are read by rules and by the plan; `plan()`
turns a composition into the StrategySpec the plan carries; the hooks run in each rank and read only that spec.
Adding a strategy: one module in trainer/strategies/ that builds a Strategy, listed in trainer/strategies/
__init__.py, plus one YAML file in conf/strategy/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from trainer.rules import Rule


@dataclass
class StrategySpec:
    """A strategy as the plan carries it: everything a rank needs, as plain values."""

    name: str
    world_size: int
    dist_backend: str  # nccl on GPUs, gloo on CPUs
    shards_weights: bool = False
    fsdp_config: Optional[Dict[str, Any]] = None
    deepspeed_config: Optional[Dict[str, Any]] = None
    # TrainingArguments this strategy adds (fsdp, ddp_backend, ...).
    training_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Strategy:
    name: str
    summary: str
    distributed: bool = False  # runs as several processes (torchrun or Slurm)
    shards_weights: bool = False  # each GPU holds a part of the weights
    # The chunked loss reads lm_head.weight directly: a ZeRO-3 partition or an FSDP2 DTensor there breaks it.
    allows_fused_ce: bool = True
    # The fused LoRA branch reads lora_A/B weights without calling those modules, so ZeRO-3's per-module
    # gather hooks would never fire; FSDP2 gathers per decoder layer, which covers it.
    allows_fused_lora: bool = True
    # train.compile compiles each decoder layer's forward; FSDP2's and ZeRO-3's per-module gather/free hooks
    # around those layers are not what this was built and tested with.
    allows_compile: bool = True
    rules: List[Rule] = field(default_factory=list)

    # ---- plan time (no torch) ----

    def plan(self, cfg: Any, device: str, compute_dtype: str, world_size: int, decoder_layer: str) -> StrategySpec:
        spec = StrategySpec(self.name, world_size, "nccl" if device == "cuda" else "gloo", self.shards_weights)
        self.configure(spec, cfg, device, compute_dtype, decoder_layer)
        if world_size < 2:
            # One process (launcher=local; the strategy.one_process rule warns): no process group to name a
            # backend for, and FSDP has nothing to shard with (the Trainer refuses it outside torch.distributed).
            spec.training_args = {}
        return spec

    def configure(self, spec: StrategySpec, cfg: Any, device: str, compute_dtype: str, decoder_layer: str) -> None:
        """Fill in this strategy's part of the spec (its config dicts and TrainingArguments)."""

    def device_map(self, device: str, quantized: bool) -> Optional[str]:
        """Where from_pretrained puts the weights: "local_rank" (this rank's own GPU) or None (the CPU).

        On GPUs each rank quantizes and keeps a full copy on its own GPU; an unquantized model under a sharded
        strategy loads on CPU and lets FSDP / ZeRO-3 move shards. Quantized ones (bnb4: the only backend the
        rules let shard) quantize on their GPU, since FSDP and ZeRO-3 move and shard the packed weight tensors
        but never bnb's quant state; a rank briefly holds the whole 4-bit model (~0.56 byte/param).
        """
        if device != "cuda":
            return None
        return "local_rank" if (not self.shards_weights or quantized) else None

    # ---- run time (in each rank) ----

    def prepare_process_group(self, spec: StrategySpec, device: str) -> None:
        """Start what accelerate would not start by itself (CPU process groups); nothing by default."""
        if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # accelerate names each CPU rank's device "cpu:<rank>", and the Trainer's resume then fails in
            # torch.load(map_location="cpu:0") ("don't know how to restore data location"). One CPU is "cpu".
            os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"

    def training_arguments(self, spec: StrategySpec, run_dir: str, device: str) -> Dict[str, Any]:
        return dict(spec.training_args)

    def save_final(self, trainer: Any, target: str) -> None:
        """Save the adapter (or model) as one full, loadable copy. Collective: every rank calls it."""
        trainer.save_model(target)
