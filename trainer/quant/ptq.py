"""FP8 and MXFP4 checkpoints: dequantized to the compute dtype on load, then trained like any model.

Because the weights are ordinary floats after loading, FSDP and ZeRO-3 can shard them and full
fine-tuning is allowed.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant import Backend, Requirement
from trainer.quant.common import bits_rule


def _load(path: str, model_kwargs: Dict[str, Any], config_class: str) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    quant_config = getattr(transformers, config_class)(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config, **model_kwargs)


def load_fp8(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    return _load(path, model_kwargs, "FineGrainedFP8Config")


def load_mxfp4(cfg: Any, path: str, model_kwargs: Dict[str, Any]) -> Any:
    return _load(path, model_kwargs, "Mxfp4Config")


def _no_requirements(cfg: Any) -> List[Requirement]:
    return []


BACKENDS = [
    Backend(
        method="fp8",
        summary="FP8 checkpoint, dequantized on load",
        bits=(8,),
        pre_quantized=True,
        trains_quantized=False,
        rules=[bits_rule("fp8", (8,), "an FP8 checkpoint")],
        requirements=_no_requirements,
        loader="trainer.quant.ptq:load_fp8",
        default_bits=8,
    ),
    Backend(
        method="mxfp4",
        summary="MXFP4 checkpoint, dequantized on load",
        bits=(4,),
        pre_quantized=True,
        trains_quantized=False,
        rules=[bits_rule("mxfp4", (4,), "an MXFP4 checkpoint")],
        requirements=_no_requirements,
        loader="trainer.quant.ptq:load_mxfp4",
        default_bits=4,
    ),
]
