"""The structured schema of `python -m trainer.export` (conf/export.yaml).

An export takes a finished run (`run_dir=`: base model, adapter and tokenizer from its plan) or a base model and
adapters (the same `model` group as training, so `model=llama3_8b model.adapters=[outputs/.../adapter]` means
the same thing here as in train.py), and writes one of: a merged 16-bit model (`merged`), that merged model
GPTQ-quantized with a calibration set (`gptq`), or a clean PEFT adapter with a model card (`adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore

from trainer.schema import ModelConfig, TrainLoop


class ExportMethod(str, Enum):
    merged = "merged"
    gptq = "gptq"
    adapter = "adapter"


class ExportDtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class MergedDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class ExportSpec:
    method: ExportMethod = ExportMethod.merged
    # merged: the dtype the merged weights are saved in.
    dtype: MergedDtype = MergedDtype.bfloat16
    # merged/gptq of a run trained on bnb 4/8-bit: merge into the dequantized 4/8-bit weights the adapter was
    # trained against, instead of the original 16-bit checkpoint (the default).
    dequantize: bool = False
    # gptq: bits, calibration and kernel layout.
    bits: int = 4
    # A JSON/JSONL file of alpaca, sharegpt or {"text": ...} records; GPTQ fits its rounding to it.
    dataset: Optional[str] = None
    nsamples: int = 128
    max_len: int = 512
    group_size: int = 128
    desc_act: bool = False
    compute_dtype: ExportDtype = ExportDtype.float16


@dataclass
class ExportRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportSpec = field(default_factory=ExportSpec)
    # A finished training run: its plan names the base model, its adapter/ holds the adapter and tokenizer.
    run_dir: Optional[str] = None
    # Null: <output_root>/export/<run or model preset>-<method>-<time>. Never an existing dir.
    output_dir: Optional[str] = None
    output_root: str = "outputs"
    seed: int = 0
    # Model presets are `# @package _global_` and may carry the training defaults that suit them
    # (conf/model/tiny.yaml does); the export composes them unchanged and does not read `train`.
    train: TrainLoop = field(default_factory=TrainLoop)


def register_export_schema() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportRunConfig)
