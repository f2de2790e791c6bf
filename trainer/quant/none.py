"""No quantization: the base model in its compute dtype."""

from __future__ import annotations

from typing import Any, Dict

from trainer.quant import Backend


def load(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **model_kwargs)


BACKEND = Backend(
    method="none",
    summary="no quantization (16/32-bit base weights)",
    bits=(),
    pre_quantized=False,
    trains_quantized=False,
    loader="trainer.quant.none:load",
)
