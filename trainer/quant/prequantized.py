"""What GPTQ, AWQ and AQLM share: checkpoints somebody quantized, loaded as they are."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.errors import UserError
from trainer.quant.common import no_sharding_rule
from trainer.rules import Rule

log = logging.getLogger(__name__)


def sharding_rule(backend: str, label: str) -> Rule:
    return no_sharding_rule(
        backend,
        f"a pre-quantized {label} checkpoint",
        "FSDP and ZeRO-3 cannot shard its packed integer weights.",
    )


def checkpoint_quantization(path: str) -> Optional[Dict[str, Any]]:
    """The quantization_config in a local checkpoint's config.json (None for a hub id or none)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config") or {}


def check_checkpoint(path: str, method: str, bits: Optional[int], bits_of: Any = None) -> None:
    """Refuse a checkpoint that is not what quant=<method> says it is, before loading anything.

    A GPTQ config pointed at a 16-bit model would otherwise load unquantized, or quantize on the
    fly, silently: the run would train something other than what the user composed.
    """
    quant = checkpoint_quantization(path)
    if quant is None:
        return
    found = str(quant.get("quant_method", "")).lower()
    if found != method:
        what = f"quantized with {found}" if found else "not a quantized checkpoint"
        raise UserError(f"quant={method} needs a pre-quantized {method.upper()} checkpoint, but {path} is {what}; "
                        f"point model.name_or_path at a {method.upper()} checkpoint"
                        + (f" or use quant={found}." if found else " (python -m trainer.export makes GPTQ ones)."))
    found_bits = bits_of(quant) if bits_of else quant.get("bits")
    if bits is not None and found_bits is not None and int(found_bits) != int(bits):
        raise UserError(f"{path} is a {found_bits}-bit {method.upper()} checkpoint, but quant.bits={bits}; "
                        f"set quant.bits={found_bits}.")


def load_prequantized(path: str, model_kwargs: Dict[str, Any], **quant_overrides: Any) -> Any:
    """Load a checkpoint whose config.json carries its quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import AutoQuantizationConfig

    load_kwargs = dict(model_kwargs)
    if quant_overrides:
        config = AutoConfig.from_pretrained(path, trust_remote_code=load_kwargs.get("trust_remote_code", False))
        quant_config = getattr(config, "quantization_config", None) or {}
        if not isinstance(quant_config, dict):
            quant_config = quant_config.to_dict()
        # transformers merges only an object of the checkpoint's own config class, not a dict.
        load_kwargs["quantization_config"] = AutoQuantizationConfig.from_dict({**quant_config, **quant_overrides})
    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    log.info("quantized layers: %s", ", ".join(kernel_classes(model)) or "none found")
    return model


def kernel_classes(model: Any) -> List[str]:
    """Class names of the decoder's quantized layers (the kernel the loader chose), sorted."""
    return sorted({type(m).__name__ for m in model.get_decoder().modules()
                   if hasattr(m, "qweight") or hasattr(m, "codes")})
