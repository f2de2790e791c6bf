"""fsdp: FSDP2 (torch's fully_shard; strategy.version=1 for the wrapper class), decoder layers wrapped.

bnb 4-bit weights shard because their packed storage is the compute dtype (trainer/quant/bnb.py). On CPU it
runs on gloo: accelerate builds its FSDP plugin only for accelerator process groups, so the process group is
started here before TrainingArguments, which keeps it (accelerator_config.use_configured_state).
"""

from __future__ import annotations

from typing import Any, Dict

from trainer.errors import UserError
from trainer.rules import error, strategy
from trainer.strategies.base import Strategy, StrategySpec

RULES = [
    error(
        "strategy.fsdp_version",
        ["strategy"],
        lambda cfg: strategy(cfg) == "fsdp" and cfg.strategy.version not in (1, 2),
        "strategy.version must be 1 or 2 for FSDP, not {cfg.strategy.version}.",
        "set strategy.version=2 (fully_shard) or 1.",
    ),
]


class FSDP(Strategy):
    def configure(self, spec: StrategySpec, cfg: Any, device: str, compute_dtype: str, decoder_layer: str) -> None:
        version = int(cfg.strategy.version)
        if device == "cpu" and version == 1:
            raise UserError("strategy=fsdp strategy.version=1 needs GPUs (accelerate prepares FSDP1 only on an "
                            "accelerator); on CPU use strategy.version=2, torch's fully_shard, which runs on gloo.")
        config: Dict[str, Any] = {
            "fsdp_version": version,
            "transformer_layer_cls_to_wrap": [decoder_layer],
            # FSDP2 takes a bool; FSDP1 names the sharding strategy.
            "reshard_after_forward": True if version == 2 else "full_shard",
            "cpu_ram_efficient_loading": False,
            # Sharded during training (each rank writes its part); save_final gathers a full adapter at the end.
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_offload": bool(cfg.strategy.offload_params),
            "activation_checkpointing": False,
        }
        if version == 1:
            # Adapters leave frozen and trainable parameters in one wrapped unit; FSDP1 flattens a unit into one
            # tensor unless it keeps the original parameters.
            config["use_orig_params"] = True
        spec.fsdp_config = config
        # fsdp=True: everything else is in fsdp_config (transformers deprecates the option string).
        spec.training_args = {"fsdp": True, "fsdp_config": config, "ddp_backend": spec.dist_backend}
        if device == "cpu":
            # accelerate turns FSDP off when told use_cpu; torch's fully_shard runs on gloo, and the gloo process
            # group is set up before TrainingArguments (prepare_process_group): keep it.
            spec.training_args.update(use_cpu=False, accelerator_config={"use_configured_state": True})

    def prepare_process_group(self, spec: StrategySpec, device: str) -> None:
        super().prepare_process_group(spec, device)
        if device != "cpu" or spec.world_size < 2:
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        state = PartialState(backend="gloo")
        if state.distributed_type == DistributedType.NO and state.num_processes > 1:
            state.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState turns it into FSDP

    def save_final(self, trainer: Any, target: str) -> None:
        # Checkpoints during training are sharded; the final save gathers one full state dict.
        if getattr(trainer, "is_fsdp_enabled", False):
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(target)


STRATEGY = FSDP(name="fsdp", summary="FSDP2 shards weights, gradients and optimizer states", distributed=True,
                shards_weights=True, allows_fused_ce=True, allows_compile=False, rules=RULES)
