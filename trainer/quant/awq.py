"""AWQ: pre-quantized activation-aware 4-bit checkpoints, loaded through gptqmodel.

transformers 5.x reads AWQ checkpoints with gptqmodel's kernels (autoawq is no longer used). The kernel is
named explicitly (gptq.trainable_kernel): on CPU TorchAtenAwqLinear, which has a backward pass on every CPU,
so LoRA trains on CPU and GPU alike.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant import Backend, Requirement
from trainer.quant.common import bits_rule
from trainer.quant.gptq import GPTQMODEL, gptqmodel_cpu_workers, trainable_kernel
from trainer.quant.prequantized import check_checkpoint, load_prequantized, sharding_rule
from trainer.quant.targets import mark_linear_targets

INSTALL = "pip install 'qforge[awq]'  (gptqmodel>=2.0, which transformers 5 uses for AWQ)"

RULES = [
    bits_rule("awq", (4,), "AWQ"),
    sharding_rule("awq", "AWQ"),
]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement(GPTQMODEL.module, GPTQMODEL.distribution, GPTQMODEL.minimum, INSTALL)]


def load(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    check_checkpoint(path, "awq", cfg.quant.bits)
    gptqmodel_cpu_workers()
    return mark_linear_targets(load_prequantized(path, model_kwargs, backend=trainable_kernel("awq", model_kwargs)))


BACKEND = Backend(
    method="awq",
    summary="AWQ 4-bit, pre-quantized checkpoint (gptqmodel kernels)",
    bits=(4,),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.awq:load",
    default_bits=4,
)
