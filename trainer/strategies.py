"""How each strategy maps onto the HF Trainer, accelerate and DeepSpeed: resolved into the plan."""

from __future__ import annotations

from typing import Any, Dict

from trainer.rules import peft_method, strategy

DECODER_LAYER_CLASSES = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
}


def resolve(cfg: Any, device: str, compute_dtype: str, world_size: int) -> Dict[str, Any]:
    name = strategy(cfg)
    spec: Dict[str, Any] = {
        "name": name,
        "world_size": world_size,
        "dist_backend": "nccl" if device == "cuda" else "gloo",
    }
    adapters_only = peft_method(cfg) not in ("full", "freeze")
    if name == "ddp":
        # With adapters every trainable parameter gets a gradient each step; searching for unused
        # ones costs a graph walk per step for nothing.
        spec["training_args"] = {"ddp_find_unused_parameters": not adapters_only,
                                 "ddp_backend": spec["dist_backend"]}
    elif name == "fsdp":
        spec["fsdp_config"] = fsdp_config(cfg)
        spec["training_args"] = {"fsdp": "full_shard auto_wrap", "fsdp_config": spec["fsdp_config"],
                                 "ddp_backend": spec["dist_backend"]}
    elif name in ("zero2", "zero3", "zero3_offload"):
        spec["deepspeed_config"] = deepspeed_config(cfg, compute_dtype)
        spec["training_args"] = {"ddp_backend": spec["dist_backend"]}
    return spec


def fsdp_config(cfg: Any) -> Dict[str, Any]:
    layer = DECODER_LAYER_CLASSES.get(cfg.model.family, "LlamaDecoderLayer")
    return {
        "fsdp_version": cfg.strategy.version,
        "transformer_layer_cls_to_wrap": [layer],
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT",
        "offload_params": bool(cfg.strategy.offload_params),
        "activation_checkpointing": False,
    }


def deepspeed_config(cfg: Any, compute_dtype: str) -> Dict[str, Any]:
    name = strategy(cfg)
    stage = 2 if name == "zero2" else 3
    offload = name == "zero3_offload" or cfg.strategy.offload_params
    zero: Dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Adapters and full weights are saved as one 16-bit file, not as ZeRO shards.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if offload or cfg.strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": compute_dtype == "bfloat16"},
        "fp16": {"enabled": compute_dtype == "float16"},
        "zero_optimization": zero,
    }
