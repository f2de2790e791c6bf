"""FP8 and MXFP4 checkpoints: dequantized to the compute dtype on load, then trained like any model.

Because the weights are ordinary floats after loading, FSDP and ZeRO-3 can shard them and full
fine-tuning is allowed.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.quant.base import Backend, Requirement


def _load(path: str, model_kwargs: Dict[str, Any], config_class: str) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    quant_config = getattr(transformers, config_class)(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config, **model_kwargs)


def load_fp8(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    return _load(path, model_kwargs, "FineGrainedFP8Config")


def load_mxfp4(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    return _load(path, model_kwargs, "Mxfp4Config")


def _no_requirements(cfg: Any) -> List[Requirement]:
    return []


BACKENDS = [
    Backend(
        method="fp8",
        label="an FP8 checkpoint",
        summary="FP8 checkpoint, dequantized on load",
        bits=(8,),
        pre_quantized=True,
        trains_quantized=False,
        requirements=_no_requirements,
        loader="trainer.quant.ptq:load_fp8",
    ),
    Backend(
        method="mxfp4",
        label="an MXFP4 checkpoint",
        summary="MXFP4 checkpoint, dequantized on load",
        bits=(4,),
        pre_quantized=True,
        trains_quantized=False,
        requirements=_no_requirements,
        loader="trainer.quant.ptq:load_mxfp4",
    ),
]
