"""The structured schema of `python -m trainer.export` (conf/export.yaml).

An export reads a 16-bit base model (the same `model` group as training), merges the adapters it
lists into it, and GPTQ-quantizes the merged weights with a calibration set. It reuses ModelConfig so
`model=llama3_8b model.adapters=[outputs/.../adapter]` means the same thing here as in train.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore

from trainer.schema import ModelConfig, TrainLoop


class ExportMethod(str, Enum):
    gptq = "gptq"


class ExportDtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@dataclass
class ExportSpec:
    method: ExportMethod = ExportMethod.gptq
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
    # Null: <output_root>/export/<model preset>-gptq<bits>-<time>.
    output_dir: Optional[str] = None
    output_root: str = "outputs"
    seed: int = 0
    # Model presets are `# @package _global_` and may carry the training defaults that suit them
    # (conf/model/tiny.yaml does); the export composes them unchanged and does not read `train`.
    train: TrainLoop = field(default_factory=TrainLoop)


def register_export_schema() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportRunConfig)
