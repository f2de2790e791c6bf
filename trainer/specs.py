"""The RunPlan and its parts, as typed plain values: what a rank reads instead of the composed config.

build_plan (trainer/plan.py) makes them from a validated composition; `plan.json` holds them; every rank reads
them back (trainer/rank.py) and the run-time code takes them, never the raw config. Each is JSON-able.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from trainer.errors import UserError
from trainer.strategies.base import StrategySpec


@dataclass
class ModelSpec:
    preset: str
    # A local dir or a hub id; for the embedded tiny model the cache dir it is built into on first use.
    source: str
    tiny: Optional[Dict[str, int]]  # the tiny model's shape, when source is built from it
    family: str
    decoder_layer: str  # the class FSDP wraps and partial checkpointing counts
    dtype: str
    adapters: List[str]
    new_adapter: bool
    resize_vocab: bool
    # None: from_pretrained's default (the CPU); "local_rank": this rank's own GPU; "auto": spread (inference).
    device_map: Optional[str]
    trust_remote_code: bool
    attn_implementation: str
    upcast_layernorm: bool


@dataclass
class QuantSpec:
    method: str
    bits: Optional[int]
    backend: str  # what the backend is, for people
    pre_quantized: bool
    trains_quantized: bool  # False where weights are dequantized on load (FP8, MXFP4)
    loader: str  # "module:function" taking (path, QuantSpec, from_pretrained kwargs)
    # The backend's real loading arguments (BitsAndBytesConfig's, HQQ's bits and group size, gptqmodel's kernel).
    load_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PeftSpec:
    method: str  # lora, dora, oft, pissa, full, freeze
    trains_adapter: bool
    kwargs: Dict[str, Any]  # peft's LoraConfig/OFTConfig arguments, or the freeze/full description


@dataclass
class SpeedSpec:
    packing: bool
    flatten_packed_rows: bool  # varlen attention reads packed rows as one flat sequence
    fused_cross_entropy: bool
    fused_lora: str  # "on", "off", or "auto" (on where a step has enough work)
    liger: str  # "on", "off", or "auto" (on with CUDA and liger-kernel installed)
    gradient_checkpointing: bool
    checkpoint_layers: Optional[int]  # None: every decoder layer
    offload_activations: bool  # what the decoder layers save goes to pinned host memory (trainer/offload.py)
    tokens_per_step: int  # batch x max_seq_len, for fused_lora=auto
    # Under offload: how many un-checkpointed layers offload all they save (None: every one); the others keep it.
    offload_layers: Optional[int] = None
    compile_layers: bool = False  # train.compile: decoder layers' training forward through torch.compile
    embeddings_on_host: bool = False  # train.embeddings_on_host as resolved: the table in pinned host memory


@dataclass
class RunSpec:
    """The run's own switches."""

    do_train: bool
    do_eval: bool
    seed: int
    output_root: str
    resume: str  # auto, never, or a checkpoint dir
    save_total_limit: int
    callbacks: List[str]  # "module:function" factories of extra TrainerCallbacks
    eval_samples: int = 0  # held-out prompts answered before and after training (trainer/samples.py)
    eval_max_new_tokens: int = 128


@dataclass
class LoggerSpec:
    name: str
    project: str
    entity: Optional[str]
    group: Optional[str]
    mode: str
    tags: List[str]


@dataclass
class LauncherSpec:
    name: str
    nproc_per_node: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: Optional[str]
    rdzv_id: Optional[str]
    preemption_signal: Optional[str]  # the warning signal's name (USR2), on Slurm
    slurm: Optional[Dict[str, Any]] = None  # launcher.slurm's settings, for rendering the sbatch script


@dataclass
class RequirementSpec:
    asked_by: str
    module: str
    distribution: str
    minimum: Optional[str]
    install: str
    needs_gpu: bool


# Bumped when plan.json's layout changes: a rank refuses a plan of another layout (trainer/rank.py).
PLAN_FORMAT = 2
PLAN_FILE = "plan.json"


def qforge_version() -> str:
    try:
        return version("qforge")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class RunPlan:
    run_dir: str
    run_name: str
    device: str  # "cuda" or "cpu"
    world_size: int
    compute_dtype: str
    model: ModelSpec
    quant: QuantSpec
    peft: PeftSpec
    strategy: StrategySpec
    # What the run trains on, as trainer/data/spec.py builds it (sources with their identity and record counts,
    # template, max_seq_len, packing, streaming, cache dir, fingerprint); trainer/data/prepare.py reads it.
    data: Dict[str, Any]
    speed: SpeedSpec
    run: RunSpec
    training_args: Dict[str, Any]
    logger: LoggerSpec
    launcher: LauncherSpec
    # The predicted per-GPU peak memory and its breakdown (trainer/memory/), and what it was compared with.
    memory: Dict[str, Any] = field(default_factory=dict)
    requirements: List[RequirementSpec] = field(default_factory=list)
    # Installed versions of qforge, torch, transformers, peft, accelerate and what the composition adds.
    versions: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    qforge_version: str = field(default_factory=qforge_version)
    plan_format: int = PLAN_FORMAT

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> RunPlan:
        """The plan back from plan.json, nested specs typed again; an unknown layout is refused."""
        if data.get("plan_format") != PLAN_FORMAT:
            raise UserError(f"this plan has layout {data.get('plan_format')} but this qforge reads layout "
                            f"{PLAN_FORMAT}; launch the run again with this qforge (python train.py ...).")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        nested = {"model": ModelSpec, "quant": QuantSpec, "peft": PeftSpec, "strategy": StrategySpec,
                  "speed": SpeedSpec, "run": RunSpec, "logger": LoggerSpec, "launcher": LauncherSpec}
        values: Dict[str, Any] = {}
        for key, value in data.items():
            if key not in types:
                raise UserError(f"plan.json has a key {key} this qforge does not know; launch the run again.")
            values[key] = nested[key](**value) if key in nested else value
        values["requirements"] = [RequirementSpec(**r) for r in data.get("requirements", [])]
        return cls(**values)

    def write(self) -> Path:
        """RUN_DIR/.hydra/plan.json, atomically (every node of a multi-node launch may write it)."""
        path = Path(self.run_dir) / ".hydra" / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{PLAN_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, run_dir: str) -> RunPlan:
        path = Path(run_dir) / ".hydra" / PLAN_FILE
        if not path.is_file():
            raise UserError(f"{run_dir} holds no {PLAN_FILE}; a rank trains only a run its launcher planned: start "
                            "it with python train.py (or sbatch slurm/train.sbatch).")
        return cls.from_dict(json.loads(path.read_text()))
