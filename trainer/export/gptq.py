"""export.method=gptq: the merged float16 model, GPTQ-quantized with calibration text (gptqmodel via transformers).

GPTQ fits its rounding to the weights the adapters changed, so the adapters are merged first (into a scratch
copy beside the output), then the merged model is quantized and saved. The result trains again with
`python train.py quant=gptq model=local model.name_or_path=<output_dir>`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from trainer.errors import UserError
from trainer.export.merged import load_base, load_tokenizer, merge_adapters
from trainer.export.source import ExportSource
from trainer.export.writing import atomic_dir, write_manifest

log = logging.getLogger("qforge")


def preflight() -> None:
    from trainer.preflight import check_requirements
    from trainer.quant.gptq import export_requirements, gptqmodel_cpu_workers

    check_requirements([("export.method=gptq", r) for r in export_requirements()])
    gptqmodel_cpu_workers()


def calibration_texts(path: str, tokenizer: Any, nsamples: int, max_len: int) -> List[str]:
    """Up to nsamples texts of at most max_len tokens from alpaca, sharegpt or {"text"} records."""
    from trainer.data import alpaca_turns, read_records, sharegpt_turns

    texts: List[str] = []
    for number, record in enumerate(read_records(path), start=1):
        if len(texts) >= nsamples:
            break
        where = f"{path} record {number}"
        if isinstance(record.get("text"), str):
            text = record["text"]
        elif "conversations" in record or "messages" in record:
            text = "\n".join(turn for turn, _ in sharegpt_turns(record, where))
        else:
            text = "\n".join(turn for turn, _ in alpaca_turns(record, where))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        if ids:
            texts.append(tokenizer.decode(ids))
    if not texts:
        raise UserError(f"{path} gave no calibration text; point export.dataset at a file with text records.")
    return texts


def export_gptq(cfg: Any, source: ExportSource, out: Path) -> Dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    preflight()
    started = time.monotonic()
    tokenizer = load_tokenizer(source)
    texts = calibration_texts(cfg.export.dataset, tokenizer, cfg.export.nsamples, cfg.export.max_len)
    model = merge_adapters(load_base(source, "float16", bool(cfg.export.dequantize)), source.adapters,
                           source.base.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged_dir = Path(tempfile.mkdtemp(prefix=".merged-fp16-", dir=out.parent))
    try:
        model.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        del model
        gptq = GPTQConfig(bits=int(cfg.export.bits), group_size=int(cfg.export.group_size),
                          desc_act=bool(cfg.export.desc_act), dataset=texts, tokenizer=tokenizer,
                          model_seqlen=int(cfg.export.max_len))
        quantized = AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=gptq, dtype=torch.float16,
                                                         trust_remote_code=source.base.trust_remote_code)
        manifest = {
            "base": source.base.source,
            "adapters_merged": source.adapters,
            "run_dir": source.run_dir,
            "method": "gptq",
            "bits": int(cfg.export.bits),
            "group_size": int(cfg.export.group_size),
            "desc_act": bool(cfg.export.desc_act),
            "calibration": {"dataset": cfg.export.dataset, "nsamples": len(texts), "max_len": int(cfg.export.max_len)},
        }
        with atomic_dir(out) as scratch:
            quantized.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            manifest["seconds"] = round(time.monotonic() - started, 1)
            write_manifest(scratch, manifest)
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    log.info("exported GPTQ %d-bit model to %s in %.1f s", cfg.export.bits, out, manifest["seconds"])
    return manifest
