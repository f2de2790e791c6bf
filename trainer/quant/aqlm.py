"""AQLM: pre-quantized additive-quantization checkpoints (1-4 bits per weight, codebook based).

aqlm's QuantizedLinear has a backward pass on every kernel it picks: CUDA kernels for the 1x16
and 2x8 layouts, triton otherwise on GPU; on CPU numba for 256-entry codebooks (aqlm[cpu]) and a
pure-torch dequantize-and-matmul for the rest.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant.base import Backend, Requirement
from trainer.quant.prequantized import check_checkpoint, load_prequantized, sharding_rule
from trainer.quant.targets import mark_linear_targets

INSTALL = "pip install 'qforge[aqlm]'  (aqlm[gpu,cpu]>=1.1)"

RULES = [sharding_rule("aqlm", "AQLM")]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement("aqlm", "aqlm", "1.1.0", INSTALL)]


def checkpoint_bits(quant: Dict[str, Any]) -> float:
    """Average bits per weight of an AQLM layout: codes per group over weights per group."""
    group = int(quant.get("in_group_size", 8)) * int(quant.get("out_group_size", 1))
    return int(quant.get("num_codebooks", 1)) * int(quant.get("nbits_per_codebook", 16)) / group


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    check_checkpoint(path, "aqlm", spec.bits, bits_of=lambda q: round(checkpoint_bits(q)))
    return mark_linear_targets(load_prequantized(path, model_kwargs))


BACKEND = Backend(
    method="aqlm",
    label="AQLM",
    summary="AQLM 1-4 bit codebooks, pre-quantized checkpoint",
    bits=(1, 2, 3, 4),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.aqlm:load",
)
