"""export.method=merged: the base in 16 bit with the adapters merged in, saved as a model any server loads.

The base is loaded unquantized from the original checkpoint (what plan.model.source names for a run trained on
bnb 4/8-bit or HQQ: quantization happened while loading, the checkpoint itself is 16-bit), never by dequantizing
the quantized copy unless export.dequantize=true asks for exactly the weights the adapter was trained against
(bnb runs). The result is safetensors shards, the tokenizer with its chat template, and a generation config
whose end-of-sequence ids include the template's end-of-turn token.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List

from trainer.errors import UserError
from trainer.export.source import ExportSource
from trainer.export.writing import atomic_dir, write_manifest

log = logging.getLogger("qforge")

# End-of-turn tokens of the common chat templates: generation must stop on them as on eos.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")


def load_base(source: ExportSource, dtype_name: str, dequantize: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.model import model_source

    dtype = getattr(torch, dtype_name)
    path = model_source(source.base)
    if not dequantize:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=source.base.trust_remote_code)
    plan = source.plan
    if plan is None or plan.quant.method != "bnb":
        trained = plan.quant.method if plan else "an unknown backend (no run_dir)"
        raise UserError(f"export.dequantize=true merges into the bitsandbytes weights a run trained against, but "
                        f"this adapter was trained on {trained}; leave export.dequantize=false to merge into the "
                        "16-bit original.")
    from trainer.quant.bnb import from_pretrained

    kwargs = dict(plan.quant.load_kwargs)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if key in kwargs:
            kwargs[key] = dtype_name
    model = from_pretrained(path, kwargs, {"dtype": dtype})
    model = model.dequantize()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model.to(dtype)


def merge_adapters(model: Any, adapters: List[str], base_name: str) -> Any:
    from peft import PeftModel

    for adapter in adapters:
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UserError(f"the adapter {adapter} does not fit the base model {base_name} ({first}); export it "
                            "with the base it was trained on (run_dir=<its run>, or model.name_or_path).") from None
    return model


def load_tokenizer(source: ExportSource) -> Any:
    from transformers import AutoTokenizer

    from trainer.model import load_tokenizer as base_tokenizer

    if source.tokenizer_dir and (Path(source.tokenizer_dir) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(source.tokenizer_dir)
    return base_tokenizer(source.base)


def end_of_turn_ids(tokenizer: Any, model: Any) -> List[int]:
    """eos ids for generation: the model's, the tokenizer's, and the chat template's end-of-turn token."""
    ids: List[int] = []
    configured = model.generation_config.eos_token_id
    for value in (configured if isinstance(configured, list) else [configured]) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    template = str(getattr(tokenizer, "chat_template", "") or "")
    for token in END_OF_TURN:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in template and isinstance(token_id, int) and token_id != tokenizer.unk_token_id \
                and token_id not in ids:
            ids.append(token_id)
    return ids


def export_merged(cfg: Any, source: ExportSource, out: Path) -> Dict[str, Any]:
    started = time.monotonic()
    dtype = cfg.export.dtype.value
    model = load_base(source, dtype, bool(cfg.export.dequantize))
    model = merge_adapters(model, source.adapters, source.base.source)
    tokenizer = load_tokenizer(source)
    eos = end_of_turn_ids(tokenizer, model)
    model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True  # training switched it off; a served model wants it
    manifest = {"method": "merged", "dtype": dtype, "base": source.base.source, "adapters_merged": source.adapters,
                "run_dir": source.run_dir, "dequantized": bool(cfg.export.dequantize), "eos_token_ids": eos}
    with atomic_dir(out) as scratch:
        model.save_pretrained(scratch, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(scratch)
        manifest["seconds"] = round(time.monotonic() - started, 1)
        write_manifest(scratch, manifest)
    log.info("exported a merged %s model to %s in %.1f s", dtype, out, manifest["seconds"])
    return manifest
