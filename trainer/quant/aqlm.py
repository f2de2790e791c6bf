"""AQLM: pre-quantized additive-quantization checkpoints (1-4 bits per weight, codebook based)."""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant import Backend, Requirement
from trainer.quant.common import bits_rule
from trainer.quant.prequantized import load_prequantized, sharding_rule

INSTALL = "pip install 'qforge[aqlm]'  (aqlm[gpu]>=1.1)"

RULES = [
    bits_rule("aqlm", (1, 2, 3, 4), "AQLM"),
    sharding_rule("aqlm", "AQLM"),
]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement("aqlm", "aqlm", "1.1.0", INSTALL)]


def load(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    return load_prequantized(path, model_kwargs)


BACKEND = Backend(
    method="aqlm",
    summary="AQLM 1-4 bit codebooks, pre-quantized checkpoint",
    bits=(1, 2, 3, 4),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.aqlm:load",
    default_bits=2,
)
