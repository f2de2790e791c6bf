"""The embedded default model: a tiny Llama-architecture model with random weights, built locally.

It is built once per architecture into a cache dir and then loaded like any checkpoint, so every
quantization backend goes through its real loading path (from_pretrained) even in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"


def cache_root() -> Path:
    return Path(os.environ.get("QFORGE_CACHE", Path.home() / ".cache" / "qforge"))


def arch_dict(arch: Any) -> Dict[str, int]:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "init_seed")
    return {k: int(arch[k] if isinstance(arch, dict) else getattr(arch, k)) for k in keys}


def tiny_model_dir(arch: Any) -> Path:
    spec = arch_dict(arch)
    tokenizer_hash = hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()[:8]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "tiny" / f"llama-{digest}-{tokenizer_hash}"


def ensure_tiny_model(arch: Any) -> Path:
    """Build the model (weights + shipped tokenizer) unless a complete copy is already cached."""
    target = tiny_model_dir(arch)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = arch_dict(arch)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec["init_seed"])
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a scratch dir and rename: concurrent ranks or runs never see a half-written model.
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
