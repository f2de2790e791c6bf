"""GPTQ export: merge adapters into the 16-bit base, GPTQ-quantize it with calibration text, save.

    python -m trainer.export model=local model.name_or_path=/models/base \
        model.adapters=[outputs/<run>/adapter] export.dataset=data.jsonl export.bits=4 output_dir=/models/out

compose (conf/export.yaml) -> rules (trainer.export_rules) -> preflight (packages, a 16-bit base,
adapter dirs) -> load base in float16 -> merge adapters -> GPTQ (gptqmodel through transformers'
GPTQConfig) -> save. The result trains with `python train.py quant=gptq model=local
model.name_or_path=<output_dir>`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from trainer.errors import UserError

log = logging.getLogger("qforge")


def run_export(cfg: Any) -> Path:
    """Run one export from a composed config; returns the output directory."""
    from trainer.export_rules import RULES
    from trainer.validate import validate

    report = validate(cfg, rules=RULES)
    if not report.ok:
        # Every violated rule at once, as the training validator reports them.
        raise UserError(report.summary())
    _preflight(cfg)
    if cfg.model.name_or_path is not None:
        _refuse_quantized_base(os.path.expanduser(str(cfg.model.name_or_path)))

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    from trainer.model import load_tokenizer, model_source

    started = time.monotonic()
    spec = base_model_spec(cfg)
    source = model_source(spec)
    tokenizer = load_tokenizer(spec)
    texts = calibration_texts(cfg.export.dataset, tokenizer, cfg.export.nsamples, cfg.export.max_len)
    out = Path(output_dir(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)

    # Merged first, in float16: GPTQ quantizes what the adapters changed, not the base alone.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16,
                                                 trust_remote_code=bool(cfg.model.trust_remote_code))
    for adapter in cfg.model.adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged_dir = Path(tempfile.mkdtemp(prefix=".merged-fp16-", dir=out.parent))
    try:
        model.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        del model
        gptq = GPTQConfig(
            bits=int(cfg.export.bits),
            group_size=int(cfg.export.group_size),
            desc_act=bool(cfg.export.desc_act),
            dataset=texts,
            tokenizer=tokenizer,
            model_seqlen=int(cfg.export.max_len),
        )
        quantized = AutoModelForCausalLM.from_pretrained(
            merged_dir, quantization_config=gptq, dtype=torch.float16,
            trust_remote_code=bool(cfg.model.trust_remote_code))
        quantized.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)
    manifest = {
        "base": source,
        "adapters_merged": list(cfg.model.adapters),
        "method": "gptq",
        "bits": int(cfg.export.bits),
        "group_size": int(cfg.export.group_size),
        "desc_act": bool(cfg.export.desc_act),
        "calibration": {"dataset": cfg.export.dataset, "nsamples": len(texts), "max_len": int(cfg.export.max_len)},
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "qforge_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported GPTQ %d-bit model to %s in %.1f s", cfg.export.bits, out, manifest["seconds"])
    return out


def base_model_spec(cfg: Any) -> Any:
    """The 16-bit base the adapters merge into, as the loaders take it (trainer/specs.ModelSpec)."""
    from trainer.specs import ModelSpec
    from trainer.tiny import arch_dict, tiny_model_dir

    tiny = arch_dict(cfg.model.tiny) if cfg.model.name_or_path is None else None
    source = str(tiny_model_dir(tiny)) if tiny else os.path.expanduser(str(cfg.model.name_or_path))
    return ModelSpec(preset=cfg.model.preset, source=source, tiny=tiny, family=cfg.model.family.value,
                     decoder_layer="", dtype="float16", adapters=list(cfg.model.adapters), new_adapter=False,
                     resize_vocab=False, device_map=None, trust_remote_code=bool(cfg.model.trust_remote_code),
                     attn_implementation=cfg.model.attn_implementation, upcast_layernorm=False)


def output_dir(cfg: Any) -> str:
    if cfg.output_dir:
        return os.path.expanduser(str(cfg.output_dir))
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return os.path.join(str(cfg.output_root), "export", f"{cfg.model.preset}-gptq{cfg.export.bits}-{stamp}")


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


def _preflight(cfg: Any) -> None:
    from trainer.preflight import check_requirements
    from trainer.quant.gptq import export_requirements, gptqmodel_cpu_workers

    check_requirements([("export.method=gptq", r) for r in export_requirements()])
    gptqmodel_cpu_workers()
    for adapter in cfg.model.adapters:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"model.adapters lists {adapter}, which holds no adapter_config.json; point it at "
                            "the adapter/ directory of a training run.")


def _refuse_quantized_base(source: str) -> None:
    """Adapters merge only into 16-bit weights; a quantized base (or an adapter dir) is refused."""
    config_path = Path(source) / "config.json"
    if (Path(source) / "adapter_config.json").is_file() and not config_path.is_file():
        raise UserError(f"{source} is an unmerged adapter, not a model; set model.name_or_path to its base "
                        f"model and model.adapters=[{source}] so the export merges it first.")
    if config_path.is_file():
        config: Dict[str, Any] = json.loads(config_path.read_text())
        quant = config.get("quantization_config")
        if quant:
            raise UserError(f"{source} is already quantized ({quant.get('quant_method', 'unknown method')}); "
                            "adapters can be merged only into 16-bit weights, so export from the 16-bit base "
                            "model with model.adapters=[<your adapter>].")


def compose_export(overrides: List[str]) -> Any:
    """Compose conf/export.yaml with overrides, exactly as `python -m trainer.export` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.compose import conf_dir, register
    from trainer.export_schema import register_export_schema

    register()
    register_export_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


def main() -> None:
    import hydra

    from trainer.compose import conf_dir, register
    from trainer.export_schema import register_export_schema
    from trainer.log import configure_logging

    register()
    register_export_schema()

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="export")
    def _main(cfg: Any) -> None:
        configure_logging()
        try:
            out = run_export(cfg)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        print(f"qforge: exported to {out}")

    _main()


if __name__ == "__main__":
    main()
