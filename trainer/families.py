"""Decoder families: the class of one decoder layer (what FSDP wraps and partial checkpointing counts).

`model.family=auto` (the default) reads `model_type` from a local checkpoint's config.json; presets name theirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from trainer.errors import UserError

DECODER_LAYERS: Dict[str, str] = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "qwen3": "Qwen3DecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
    "mixtral": "MixtralDecoderLayer",
    "gpt_oss": "GptOssDecoderLayer",
    "chatglm": "GLMBlock",
}


def resolve(family: str, source: Optional[str]) -> str:
    """The family to plan with: as named, or for auto the local config.json's model_type (llama otherwise)."""
    if family != "auto":
        return family
    config = Path(source) / "config.json" if source else None
    if config is None or not config.is_file():
        return "llama"  # the embedded tiny model, or a hub id not readable here: Llama's layout
    model_type = str(json.loads(config.read_text()).get("model_type", "llama"))
    if model_type not in DECODER_LAYERS:
        raise UserError(f"{source} is a {model_type} model, which qforge has no decoder-layer facts for; set "
                        f"model.family to one of {', '.join(DECODER_LAYERS)} if its layout matches, or use "
                        "another model.")
    return model_type
