"""What both sides train on: a random-weight checkpoint of a given shape and synthetic instruction data.

Both sides load the same safetensors checkpoint through from_pretrained with bitsandbytes and read the
same examples (tokenized once by qforge's data code, so token counts are identical on both sides).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Dict, List

from trainer.tiny import TOKENIZER_DIR

# Llama-3-8B and Llama-3.2-1B shapes (untied head, so both sides have the same frozen lm_head), and a
# tiny one for the CPU smoke test.
SHAPES: Dict[str, Dict[str, int]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=810),  # the shipped tokenizer, ChatML tokens included
}


def build_checkpoint(shape: str, root: Path) -> Path:
    """Random bf16 weights built directly on the GPU (CPU for tiny), saved once per shape under root.

    max_position_embeddings covers the longest item (L, 16384 tokens): unsloth rescales RoPE past it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = root / f"llama-{shape}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=16384, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    scratch = root / f".building-llama-{shape}"
    model.save_pretrained(scratch, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(scratch)
    del model
    scratch.rename(target)
    return target


def _word_ids(tokenizer) -> List[int]:
    """Token ids that decode to plain lowercase words: decoding and re-tokenizing keeps lengths close."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if i not in special and text.strip().isalpha() and text.strip().islower():
            ids.append(i)
    return ids


def write_data(path: Path, kind: str, count: int, max_len: int, seed: int = 0) -> Path:
    """Alpaca JSONL. fixed: every example fills max_len. variable: lognormal lengths (median max_len/8, long tail).

    Real instruction sets (alpaca, sharegpt) have a median of a few hundred tokens and a tail to the
    context length; lognormal with sigma 1 and a median of max_len/8 gives that shape (256 at 2048).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    words = _word_ids(tokenizer)
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            if kind == "fixed":
                length = max_len + 64  # cut to exactly max_len by the tokenizer's truncation
            else:
                length = int(min(max_len, max(16, rng.lognormvariate(math.log(max_len / 8), 1.0))))
            prompt = max(4, int(length * rng.uniform(0.1, 0.5)))
            record = {
                "instruction": tokenizer.decode([rng.choice(words) for _ in range(prompt)]),
                "input": "",
                "output": tokenizer.decode([rng.choice(words) for _ in range(length - prompt)]),
            }
            out.write(json.dumps(record) + "\n")
    return path
