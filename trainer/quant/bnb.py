"""bitsandbytes: 4-bit (NF4/FP4) and 8-bit (LLM.int8) quantization applied while loading."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from trainer.quant.base import Backend, Requirement
from trainer.rules import error, method, warning
from trainer.strategies import shards_weights

INSTALL = "pip install 'qforge[bnb]'  (bitsandbytes>=0.43)"
BITS = (4, 8)


def _is_bnb(cfg: Any, bits: int) -> bool:
    return method(cfg) == "bnb" and cfg.quant.bits == bits


def saved_quantization(cfg: Any) -> Optional[Dict[str, Any]]:
    """The quantization_config of a checkpoint that is already quantized (config.json readable here), else None."""
    from trainer.memory.shapes import model_config

    config = model_config(cfg)
    quant = config.get("quantization_config") if config else None
    return quant if isinstance(quant, dict) and quant else None


def _saved_bits(quant: Dict[str, Any]) -> Optional[int]:
    if quant.get("load_in_4bit") or quant.get("_load_in_4bit"):
        return 4
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        return 8
    return None


def _prequantized_mismatch(cfg: Any) -> Optional[Dict[str, str]]:
    """What a pre-quantized bitsandbytes checkpoint has that the composition does not ask for (None: nothing)."""
    if method(cfg) != "bnb":
        return None
    quant = saved_quantization(cfg)
    if quant is None:
        return None
    found = str(quant.get("quant_method", "")).lower()
    if found != "bitsandbytes":
        return {"what": f"already quantized with {found or 'an unknown method'}",
                "fix": f"use quant={found} for it" if found in ("gptq", "awq", "aqlm", "eetq", "fp8", "mxfp4", "hqq")
                else "point model.name_or_path at its 16-bit original"}
    bits = _saved_bits(quant)
    if bits is not None and bits != cfg.quant.bits:
        return {"what": f"a pre-quantized bitsandbytes {bits}-bit checkpoint, not {cfg.quant.bits}-bit",
                "fix": f"use quant=bnb{bits}, or point model.name_or_path at its 16-bit original"}
    if bits == 4:
        saved = {"quant.quant_type": str(quant.get("bnb_4bit_quant_type", "fp4")),
                 "quant.double_quant": bool(quant.get("bnb_4bit_use_double_quant", False))}
        asked = {"quant.quant_type": cfg.quant.quant_type.value, "quant.double_quant": bool(cfg.quant.double_quant)}
        differ = [k for k in saved if saved[k] != asked[k]]
        if differ:
            return {"what": "saved with " + ", ".join(f"{k}={str(saved[k]).lower()}" for k in differ),
                    "fix": "set " + " ".join(f"{k}={str(saved[k]).lower()}" for k in differ)
                           + " (a quantized checkpoint keeps its own settings)"}
        storage = str(quant.get("bnb_4bit_quant_storage", "uint8"))
        if shards_weights(cfg) and storage not in ("bfloat16", "float16", "float32"):
            return {"what": f"stored as {storage}, which strategy={cfg.strategy.name.value} cannot shard (FSDP and "
                            "ZeRO-3 shard 4-bit weights stored as the compute dtype)",
                    "fix": "use strategy=ddp (or single/zero2), or the 16-bit original, which qforge quantizes "
                           "in a shardable layout while loading"}
    return None


def _four_bit_knobs(cfg: Any) -> List[str]:
    quant = cfg.quant
    return [k for k, v, default in (("quant.quant_type", quant.quant_type.value, "nf4"),
                                    ("quant.double_quant", quant.double_quant, True)) if v != default]


RULES = [
    error(
        "bnb.prequantized_checkpoint",
        ["quant", "model", "strategy"],
        lambda cfg: _prequantized_mismatch(cfg) is not None,
        "quant=bnb{cfg.quant.bits} loads {cfg.model.name_or_path} as it was saved, and it is {what}.",
        "{fix}.",
        details=lambda cfg: _prequantized_mismatch(cfg) or {},
    ),
    error(
        "bnb.8bit_not_sharded",
        ["quant", "strategy"],
        lambda cfg: _is_bnb(cfg, 8) and shards_weights(cfg),
        "bitsandbytes 8-bit weights cannot be sharded by strategy={cfg.strategy.name.value} "
        "(only 4-bit works with FSDP and ZeRO-3).",
        "use quant=bnb4 with this strategy, or keep quant=bnb8 with strategy=ddp or zero2.",
    ),
    error(
        "bnb.8bit_no_device_map_auto",
        ["quant", "model"],
        lambda cfg: _is_bnb(cfg, 8) and cfg.model.device_map is not None,
        "bitsandbytes 8-bit weights cannot be spread over devices with model.device_map=auto "
        "(only 4-bit can).",
        "use quant=bnb4, or set model.device_map=null.",
    ),
    error(
        "bnb.8bit_knobs",
        ["quant"],
        lambda cfg: _is_bnb(cfg, 8) and bool(_four_bit_knobs(cfg)),
        "{knobs} only shape 4-bit weights and do nothing with quant.bits=8.",
        "remove {knobs}, or use quant=bnb4.",
        details=lambda cfg: {"knobs": ", ".join(_four_bit_knobs(cfg))},
    ),
    warning(
        "bnb.double_quant",
        ["quant"],
        lambda cfg: _is_bnb(cfg, 4) and cfg.quant.double_quant,
        "double quantization saves about 0.37 bit per parameter at a small accuracy cost.",
        "set quant.double_quant=false to trade that memory back for accuracy.",
    ),
]


def requirements(cfg: Any) -> List[Requirement]:
    # Version floors from bitsandbytes' own history: 8-bit training landed in 0.37, 4-bit in
    # 0.39, and float quant storage (what FSDP, ZeRO-3 and device_map=auto need) in 0.43.
    if cfg.quant.bits == 8:
        floor = "0.37.0"
    else:
        floor = "0.43.0" if shards_weights(cfg) or cfg.model.device_map is not None else "0.39.0"
    return [Requirement("bitsandbytes", "bitsandbytes", floor, INSTALL)]


def quantization_kwargs(cfg: Any, device: str, compute_dtype: str) -> Dict[str, Any]:
    """The BitsAndBytesConfig arguments, printable in the plan (dtype names, not torch objects).

    bnb_4bit_quant_storage always equals the compute dtype: FSDP and ZeRO-3 flatten parameters of one
    float dtype, and a packed uint8 weight beside bf16 ones fails ("Cannot flatten integer dtype
    tensors") or, under FSDP2, trains silently with loss 0 / NaN grad norm. It is never a user knob.
    """
    saved = saved_quantization(cfg)
    if saved is not None and str(saved.get("quant_method", "")).lower() == "bitsandbytes":
        # Saved quantized (e.g. a "-bnb-4bit" checkpoint): it loads with its own settings, which the rule
        # bnb.prequantized_checkpoint checked against the composition; only the compute dtype is the run's.
        return {"saved_quantized": True, **({"bnb_4bit_compute_dtype": compute_dtype} if cfg.quant.bits == 4 else {})}
    if cfg.quant.bits == 8:
        return {"load_in_8bit": True}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": cfg.quant.quant_type.value,
        "bnb_4bit_use_double_quant": bool(cfg.quant.double_quant),
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": compute_dtype,
    }


def load(path: str, spec: Any, model_kwargs: Dict[str, Any]) -> Any:
    return from_pretrained(path, spec.load_kwargs, model_kwargs)


def from_pretrained(path: str, bnb_kwargs: Dict[str, Any], model_kwargs: Dict[str, Any]) -> Any:
    """Load `path` quantized by bitsandbytes with the plan's (printable) BitsAndBytesConfig arguments."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(bnb_kwargs)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = getattr(torch, kwargs[key])
    if kwargs.pop("saved_quantized", False):
        # The plan found the checkpoint saved quantized: transformers loads it with its own settings (it would
        # ignore a BitsAndBytesConfig with a warning).
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        compute = kwargs.get("bnb_4bit_compute_dtype")
        if compute is not None:
            for module in model.modules():
                if hasattr(module, "compute_dtype") and type(module).__name__ == "Linear4bit":
                    module.compute_dtype = compute
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(**kwargs), **model_kwargs
        )
    keep_training_layout(model)
    return model


def keep_training_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns layers pinned.

    bitsandbytes 0.48-0.50 (Linear4bit.forward), on a CPU with AVX512-BF16, repacks a layer's packed weight
    *in place* the first time it runs in eval mode without grad: the weight becomes a [N, K/2] uint8 tensor
    in another layout, absmax is cast to bf16 (double quantization undone), and every later matmul on it,
    training ones included, goes through an inference-only bf16 kernel. Saving a state dict repacks it back,
    re-quantizing absmax from its bf16 copy. So on such CPUs an evaluation changed the base weights a run
    trained on, each checkpoint changed them again (resume was not exact), the repacked uint8 weight broke
    FSDP2's and ZeRO-3's float-storage shards, and a reloaded adapter did not reproduce the trained logits.
    CPUs without AVX512-BF16 never take that path; pinning the flag makes every CPU compute the same way
    (dequantize, then a matmul in the compute dtype), in training and evaluation alike.
    """
    pinned = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            pinned += 1
    return pinned


BACKEND = Backend(
    method="bnb",
    label="bitsandbytes",
    summary="bitsandbytes NF4/FP4 4-bit or LLM.int8 8-bit, quantized while loading",
    bits=BITS,
    knobs=("quant_type", "double_quant"),
    pre_quantized=False,
    trains_quantized=True,
    rules=RULES,
    requirements=requirements,
    loader="trainer.quant.bnb:load",
    load_kwargs=quantization_kwargs,
)
