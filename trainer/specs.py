"""The parts of a RunPlan, as typed plain values: what a rank reads instead of the composed config.

build_plan (trainer/plan.py) makes them from a validated composition; `plan.json` holds them; every rank reads
them back (trainer/rank.py) and the run-time code takes them, never the raw config. Each is JSON-able.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


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
class DataSpec:
    format: str
    path: Optional[str]
    eval_fraction: float
    max_samples: Optional[int]
    split_seed: int
    max_seq_len: int
    packing: bool
    holds_out_eval: bool  # do_eval: an eval split is taken


@dataclass
class SpeedSpec:
    packing: bool
    flatten_packed_rows: bool  # varlen attention reads packed rows as one flat sequence
    fused_cross_entropy: bool
    fused_lora: str  # "on", "off", or "auto" (on where a step has enough work)
    liger: str  # "on", "off", or "auto" (on with CUDA and liger-kernel installed)
    gradient_checkpointing: bool
    checkpoint_layers: Optional[int]  # None: every decoder layer
    tokens_per_step: int  # batch x max_seq_len, for fused_lora=auto


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
