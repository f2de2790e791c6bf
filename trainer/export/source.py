"""What an export starts from: a finished run (`run_dir=`) or a base model and adapters (`model.adapters=`).

For a run, its saved plan names the base model the adapter was trained on (plan.model.source: the original
checkpoint, 16-bit, even when training loaded it through bitsandbytes or HQQ), the quantization it trained with
(for export.dequantize), and its adapter/ dir holds the adapter and the tokenizer with its chat template.
Everything is checked here, before a weight is loaded; a problem is one sentence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.errors import UserError
from trainer.specs import ModelSpec, RunPlan


@dataclass
class ExportSource:
    base: ModelSpec  # the model the adapters merge into (its tokenizer when no run gives one)
    adapters: List[str]
    tokenizer_dir: Optional[str]  # the run's adapter/ (tokenizer + chat template), else the base's
    run_dir: Optional[str] = None
    plan: Optional[RunPlan] = None
    metrics: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.run_dir).name if self.run_dir else self.base.preset


def resolve(cfg: Any) -> ExportSource:
    if cfg.run_dir is not None:
        return _from_run(os.path.abspath(os.path.expanduser(str(cfg.run_dir))))
    base = _base_from_config(cfg)
    adapters = [os.path.abspath(os.path.expanduser(str(a))) for a in cfg.model.adapters]
    for adapter in adapters:
        check_adapter_dir(adapter, "model.adapters lists")
    return ExportSource(base=base, adapters=adapters, tokenizer_dir=None)


def _from_run(run_dir: str) -> ExportSource:
    plan_file = Path(run_dir) / ".hydra" / "plan.json"
    if not plan_file.is_file():
        raise UserError(f"run_dir={run_dir} holds no qforge run (.hydra/plan.json is missing); point run_dir at "
                        "the dir of a finished training run.")
    plan = RunPlan.read(run_dir)
    if not plan.peft.trains_adapter:
        raise UserError(f"run {run_dir} trained the base weights themselves (peft={plan.peft.method}): its model/ "
                        "dir already is the whole model; load it directly, or export a run trained with an "
                        "adapter (peft=lora, dora, oft).")
    adapter = str(Path(run_dir) / "adapter")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"run {run_dir} has no adapter yet (adapter/ is missing: the run did not finish); resume it "
                        f"with python train.py ... run_dir={run_dir}, then export.")
    metrics_file = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    check_base(plan.model.source if plan.model.tiny is None else None, plan.model.preset)
    return ExportSource(base=plan.model, adapters=[adapter], tokenizer_dir=adapter, run_dir=run_dir, plan=plan,
                        metrics=metrics)


def _base_from_config(cfg: Any) -> ModelSpec:
    from trainer.tiny import arch_dict, tiny_model_dir

    tiny = arch_dict(cfg.model.tiny) if cfg.model.name_or_path is None else None
    source = str(tiny_model_dir(tiny)) if tiny else os.path.expanduser(str(cfg.model.name_or_path))
    if tiny is None:
        check_base(source, cfg.model.preset)
    return ModelSpec(preset=cfg.model.preset, source=source, tiny=tiny, family=cfg.model.family.value,
                     decoder_layer="", dtype="bfloat16", adapters=[], new_adapter=False, resize_vocab=False,
                     device_map=None, trust_remote_code=bool(cfg.model.trust_remote_code),
                     attn_implementation=cfg.model.attn_implementation, upcast_layernorm=False)


def check_base(source: Optional[str], preset: str) -> None:
    """The base must be a 16-bit transformers model dir here (a hub id not on this machine cannot be merged)."""
    if source is None:  # the embedded tiny model, built on demand
        return
    path = Path(source)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"{source} is an unmerged adapter, not a model; set model.name_or_path to its base "
                        f"model and model.adapters=[{source}] so the export merges it.")
    if not (path / "config.json").is_file():
        raise UserError(f"the base model {source} (model preset {preset}) is not a model dir on this machine; copy "
                        "the 16-bit checkpoint here and set model.name_or_path to it.")
    quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    if quant:
        raise UserError(f"{source} is already quantized ({quant.get('quant_method', 'unknown method')}); adapters "
                        "merge only into 16-bit weights: export from the 16-bit original (model.name_or_path), or "
                        "use export.method=adapter to keep the adapter apart.")


def check_adapter_dir(adapter: str, said: str) -> None:
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{said} {adapter}, which holds no adapter_config.json; point it at the adapter/ dir of a "
                        "training run.")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter} has no adapter_model.safetensors (only safetensors adapters are read); save the "
                        "adapter with safe_serialization=True, or export it from its training run.")
