"""GPTQ: pre-quantized checkpoints (gptqmodel), and export of a merged model to GPTQ."""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant import Backend, Requirement
from trainer.quant.common import bits_rule
from trainer.quant.prequantized import load_prequantized, sharding_rule

INSTALL = "pip install 'qforge[gptq]'  (gptqmodel>=2.0, optimum)"

RULES = [
    bits_rule("gptq", (2, 3, 4, 8), "GPTQ"),
    sharding_rule("gptq", "GPTQ"),
]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement("gptqmodel", "gptqmodel", "2.0.0", INSTALL)]


def load(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    # The exllama kernels are inference-only; training needs the torch/triton path.
    return load_prequantized(path, model_kwargs, use_exllama=False)


BACKEND = Backend(
    method="gptq",
    summary="GPTQ 2/3/4/8-bit, pre-quantized checkpoint",
    bits=(2, 3, 4, 8),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.gptq:load",
    default_bits=4,
)
