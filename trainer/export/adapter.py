"""export.method=adapter: a clean PEFT adapter (only the files PEFT and vLLM read) with a README model card.

The card states the base model, the data, the composition (quantization, adapter, strategy) and the metrics of
the run, so the adapter can be published or served without its run dir. adapter_config.json names the base
the adapter was trained on (the preset's hub id where there is one, else the checkpoint's path).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.export.source import ExportSource
from trainer.export.writing import atomic_dir, write_manifest

log = logging.getLogger("qforge")

# What peft's PeftModel.from_pretrained and vLLM's LoRA loader read.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def base_name(source: ExportSource) -> str:
    """The base model as a reader should find it: the hub id a preset names, else the checkpoint path."""
    plan = source.plan
    if plan is not None and plan.model.tiny is None and "/" in plan.model.source \
            and not Path(plan.model.source).exists():
        return plan.model.source
    if plan is not None and plan.model.tiny is not None:
        return "qforge embedded tiny model (random weights, built by trainer/tiny.py)"
    return source.base.source


def model_card(source: ExportSource, config: Dict[str, Any]) -> str:
    plan, metrics = source.plan, source.metrics
    base = base_name(source)
    lines = ["---", "library_name: peft", f"base_model: {json.dumps(base)}", "tags:", "  - qforge",
             f"  - {config.get('peft_type', 'lora').lower()}"]
    if plan is not None:
        lines += [f"  - {plan.quant.method}", f"  - {plan.strategy.name}"]
    lines += ["---", "", f"# {source.name}", "",
              f"A {config.get('peft_type', 'LoRA')} adapter for `{base}`, trained with qforge.", ""]
    lines += ["## Composition", "", "| | |", "|---|---|",
              f"| base model | `{base}` |",
              f"| adapter | {config.get('peft_type')} r={config.get('r')} alpha={config.get('lora_alpha')} "
              f"dropout={config.get('lora_dropout')} on {_targets(config)} |"]
    if plan is not None:
        quant = plan.quant.method + (f" {plan.quant.bits}-bit" if plan.quant.bits else "")
        lines += [f"| quantization while training | {quant} ({plan.quant.backend}) |",
                  f"| strategy | {plan.strategy.name} on {plan.world_size} process(es), {plan.compute_dtype} |",
                  f"| data | {_data_sources(plan.data)}, template {plan.data.get('template', {}).get('name')}, "
                  f"max_seq_len {plan.data.get('max_seq_len')}, "
                  f"packing {'on' if plan.speed.packing else 'off'} |",
                  f"| optimizer | {plan.training_args.get('optim')} lr {plan.training_args.get('learning_rate')}, "
                  f"{plan.training_args.get('lr_scheduler_type')} schedule, batch "
                  f"{plan.training_args.get('per_device_train_batch_size')} x grad_accum "
                  f"{plan.training_args.get('gradient_accumulation_steps')} |"]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        for key in ("steps", "train_loss", "eval_loss_before", "eval_loss", "eval_perplexity", "tokens_per_second"):
            if key in metrics:
                value = metrics[key]
                lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        versions = metrics.get("versions", {})
        if versions:
            lines += ["", "Trained with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())
                                                       if k in ("qforge", "torch", "transformers", "peft")) + "."]
    lines += ["", "## Use", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
              "model = PeftModel.from_pretrained(base, \"<this dir>\")", "```", ""]
    return "\n".join(lines)


def _data_sources(data: Dict[str, Any]) -> str:
    """The plan's data sources as `path` (format, weight), one per source."""
    parts = []
    for source in data.get("sources", []):
        weight = f", weight {source.get('weight')}" if len(data.get("sources", [])) > 1 else ""
        parts.append(f"`{source.get('path')}` ({source.get('format')}{weight})")
    return "; ".join(parts) or "none"


def _targets(config: Dict[str, Any]) -> str:
    targets: Optional[Any] = config.get("target_modules")
    if isinstance(targets, list):
        return ", ".join(sorted(targets))
    return str(targets)


def export_adapter(cfg: Any, source: ExportSource, out: Path) -> Dict[str, Any]:
    [adapter] = source.adapters
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name(source)
    copied: List[str] = []
    with atomic_dir(out) as scratch:
        for name in ADAPTER_FILES:
            if name == "adapter_config.json":
                (scratch / name).write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copy2(Path(adapter) / name, scratch / name)
            copied.append(name)
        (scratch / "README.md").write_text(model_card(source, config))
        manifest = {"method": "adapter", "adapter": adapter, "run_dir": source.run_dir, "files": copied,
                    "base": config["base_model_name_or_path"]}
        write_manifest(scratch, manifest)
    log.info("exported the adapter of %s to %s", source.name, out)
    return manifest
