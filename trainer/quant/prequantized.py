"""What GPTQ, AWQ and AQLM share: checkpoints somebody quantized, loaded as they are."""

from __future__ import annotations

from typing import Any, Dict

from trainer.quant.common import no_sharding_rule
from trainer.rules import Rule


def sharding_rule(backend: str, label: str) -> Rule:
    return no_sharding_rule(
        backend,
        f"a pre-quantized {label} checkpoint",
        "FSDP and ZeRO-3 cannot shard its packed integer weights.",
    )


def load_prequantized(path: str, model_kwargs: Dict[str, Any], **quant_overrides: Any) -> Any:
    """Load a checkpoint whose config.json carries its quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    load_kwargs = {k: v for k, v in model_kwargs.items() if k != "dtype_name"}
    if quant_overrides:
        config = AutoConfig.from_pretrained(path, trust_remote_code=load_kwargs.get("trust_remote_code", False))
        quant_config = dict(getattr(config, "quantization_config", {}) or {})
        quant_config.update(quant_overrides)
        load_kwargs["quantization_config"] = quant_config
    return AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
