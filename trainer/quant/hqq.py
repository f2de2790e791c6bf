"""HQQ: half-quadratic quantization applied after loading, with the hqq library directly.

transformers 5.x refuses HqqConfig in from_pretrained, so the base model loads in its compute dtype
and every nn.Linear of the decoder is replaced by an HQQLinear (trainer/quant/hqq_apply.py).
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant.base import Backend, Requirement
from trainer.quant.common import no_sharding_rule
from trainer.rules import error, method

INSTALL = "pip install 'qforge[hqq]'  (hqq>=0.2.1)"

RULES = [
    no_sharding_rule("hqq", "HQQ", "its packed weights are not shardable by FSDP or ZeRO-3."),
    error(
        "hqq.group_size",
        ["quant"],
        lambda cfg: method(cfg) == "hqq" and (cfg.quant.group_size < 8 or cfg.quant.group_size % 8 != 0),
        "HQQ groups weights in multiples of 8, not quant.group_size={cfg.quant.group_size}.",
        "set quant.group_size to a multiple of 8 that divides the layer width (64 is the default).",
    ),
    error(
        "hqq.no_device_map_auto",
        ["quant", "model"],
        lambda cfg: method(cfg) == "hqq" and cfg.model.device_map is not None,
        "HQQ quantizes every layer onto one device after loading, so model.device_map=auto cannot spread it.",
        "set model.device_map=null, or use quant=bnb4 to spread a quantized model over GPUs.",
    ),
]


def requirements(cfg: Any) -> List[Requirement]:
    return [Requirement("hqq", "hqq", "0.2.1", INSTALL)]


def load_kwargs(cfg: Any, device: str, compute_dtype: str) -> Dict[str, Any]:
    return {"bits": int(cfg.quant.bits), "group_size": int(cfg.quant.group_size)}


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    from trainer.quant.hqq_apply import load_and_quantize

    return load_and_quantize(path, spec.load_kwargs["bits"], spec.load_kwargs["group_size"], model_kwargs)


BACKEND = Backend(
    method="hqq",
    label="HQQ",
    summary="HQQ 1-8 bit, quantized after loading with the hqq library",
    bits=(1, 2, 3, 4, 5, 6, 8),
    knobs=("group_size",),
    pre_quantized=False,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.hqq:load",
    load_kwargs=load_kwargs,
)
