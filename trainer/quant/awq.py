"""AWQ: pre-quantized activation-aware 4-bit checkpoints, loaded through gptqmodel.

transformers 5.x reads AWQ checkpoints with gptqmodel's kernels (autoawq is no longer used). The kernel is
named explicitly (gptq.trainable_kernel): on CPU TorchAtenAwqLinear, which has a backward pass on every CPU,
so LoRA trains on CPU and GPU alike.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant.base import Backend, Requirement
from trainer.quant.gptq import GPTQMODEL, gptqmodel_cpu_workers, trainable_kernel
from trainer.quant.prequantized import check_checkpoint, load_prequantized, sharding_rule
from trainer.quant.targets import mark_linear_targets

INSTALL = "pip install 'qforge[awq]'  (gptqmodel>=2.0, which transformers 5 uses for AWQ)"

RULES = [sharding_rule("awq", "AWQ")]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement(GPTQMODEL.module, GPTQMODEL.distribution, GPTQMODEL.minimum, INSTALL)]


def load_kwargs(cfg: Any, device: str, compute_dtype: str) -> Dict[str, Any]:
    return {"backend": trainable_kernel("awq", device)}


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    check_checkpoint(path, "awq", spec.bits)
    gptqmodel_cpu_workers()
    return mark_linear_targets(load_prequantized(path, model_kwargs, **spec.load_kwargs))


BACKEND = Backend(
    method="awq",
    label="AWQ",
    summary="AWQ 4-bit, pre-quantized checkpoint (gptqmodel kernels)",
    bits=(4,),
    pre_quantized=True,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.awq:load",
    load_kwargs=load_kwargs,
)
