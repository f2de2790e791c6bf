"""No quantization: the base model in its compute dtype."""

from __future__ import annotations

from typing import Any, Dict

from trainer.quant.base import Backend


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **model_kwargs)


BACKEND = Backend(
    method="none",
    label="no quantization",
    summary="no quantization (16/32-bit base weights)",
    bits=(),
    pre_quantized=False,
    trains_quantized=False,
    loader="trainer.quant.none:load",
)
