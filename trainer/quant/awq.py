"""AWQ: pre-quantized activation-aware 4-bit checkpoints."""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant import Backend, Requirement
from trainer.quant.common import bits_rule
from trainer.quant.prequantized import load_prequantized, sharding_rule

INSTALL = "pip install 'qforge[awq]'  (autoawq>=0.2)"

RULES = [
    bits_rule("awq", (4,), "AWQ"),
    sharding_rule("awq", "AWQ"),
]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement("awq", "autoawq", "0.2.0", INSTALL, needs_gpu=True)]


def load(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    return load_prequantized(path, model_kwargs)


BACKEND = Backend(
    method="awq",
    summary="AWQ 4-bit, pre-quantized checkpoint",
    bits=(4,),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.awq:load",
    default_bits=4,
)
