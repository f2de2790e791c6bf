"""EETQ: int8 weight-only quantization applied while loading (CUDA only)."""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant.base import Backend, Requirement
from trainer.quant.common import no_sharding_rule

# eetq is not on PyPI: it builds from source against CUDA (nvcc), so the line names the repository.
INSTALL = ("pip install git+https://github.com/NetEase-FuXi/EETQ.git  (on a CUDA machine with nvcc; "
           "eetq has no PyPI release)")

RULES = [no_sharding_rule("eetq", "EETQ", "its int8 weights are not shardable by FSDP or ZeRO-3.")]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement("eetq", "eetq", None, INSTALL, needs_gpu=True)]


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM, EetqConfig

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=EetqConfig("int8"), **model_kwargs)


BACKEND = Backend(
    method="eetq",
    label="EETQ",
    summary="EETQ int8 weight-only, quantized while loading (CUDA)",
    bits=(8,),
    pre_quantized=False,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.eetq:load",
)
