"""The RunPlan: everything a run will do, resolved and printable, computed without torch.

`dry_run=true` prints it and stops. Launchers and ranks consume it; nothing downstream re-derives
a setting the plan already decided.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from trainer import strategies
from trainer.data.spec import data_spec
from trainer.env import accelerators
from trainer.preflight import package_versions
from trainer.quant import backend_for
from trainer.rules import method, peft_method, strategy
from trainer.speed import NO_FUSED_CE_STRATEGIES, uses_fused_lora


@dataclass
class RunPlan:
    run_dir: str
    run_name: str
    device: str  # "cuda" or "cpu"
    world_size: int
    compute_dtype: str
    model: Dict[str, Any]
    quant: Dict[str, Any]
    peft: Dict[str, Any]
    strategy: Dict[str, Any]
    data: Dict[str, Any]
    training_args: Dict[str, Any]
    logger: Dict[str, Any]
    launcher: Dict[str, Any]
    # Installed versions of qforge, torch, transformers, peft, accelerate and what the composition adds.
    versions: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)


def resolve_compute_dtype(cfg: Any, gpus: int, bf16: bool) -> str:
    chosen = cfg.quant.compute_dtype.value
    if chosen != "auto":
        return chosen
    if gpus == 0:
        return "float32"  # CPU kernels for bf16 matmul are slow and bnb's CPU path expects fp32
    return "bfloat16" if bf16 else "float16"


def world_size(cfg: Any, gpus: int) -> int:
    launcher = cfg.launcher.name.value
    if launcher == "local":
        return 1
    if launcher == "slurm":
        return cfg.launcher.slurm.nodes * max(cfg.launcher.slurm.gpus_per_node, 1)
    return nproc_per_node(cfg, gpus) * cfg.launcher.nnodes


def nproc_per_node(cfg: Any, gpus: int) -> int:
    value = str(cfg.launcher.nproc_per_node)
    if value == "auto":
        return max(gpus, 1)
    return int(value)


def default_run_dir(cfg: Any, now: Optional[_dt.datetime] = None) -> str:
    """A fresh dir per run: timestamp, the composition, and a random suffix.

    Two runs started in the same second (hydra #1607) still get different dirs.
    """
    now = now or _dt.datetime.now()
    tag = f"{cfg.quant.method.value}{cfg.quant.bits or ''}-{peft_method(cfg)}-{strategy(cfg)}"
    suffix = secrets.token_hex(3)
    return os.path.join(cfg.output_root, now.strftime("%Y-%m-%d"), f"{now:%H-%M-%S}-{tag}-{suffix}")


def build_plan(cfg: Any, run_dir: Optional[str] = None) -> RunPlan:
    acc = accelerators()
    gpus = acc.gpus if cfg.launcher.name.value != "slurm" else cfg.launcher.slurm.gpus_per_node
    bf16 = acc.bf16 if cfg.launcher.name.value != "slurm" else True
    dtype = resolve_compute_dtype(cfg, gpus, bf16)
    device = "cuda" if gpus > 0 else "cpu"
    run_dir = os.path.abspath(run_dir or cfg.run_dir or default_run_dir(cfg))
    size = world_size(cfg, gpus)
    strat = strategies.resolve(cfg, device=device, compute_dtype=dtype, world_size=size)
    return RunPlan(
        run_dir=run_dir,
        run_name=cfg.run_name or os.path.basename(run_dir),
        device=device,
        world_size=size,
        compute_dtype=dtype,
        model=_model_spec(cfg, dtype),
        quant=_quant_spec(cfg, dtype),
        peft=_peft_spec(cfg),
        strategy=strat,
        data=data_spec(cfg),
        training_args=training_args(cfg, run_dir, device, dtype, strat),
        logger={
            "name": cfg.logger.name.value,
            "project": cfg.logger.project,
            "mode": cfg.logger.mode.value,
            "tags": [cfg.quant.method.value, peft_method(cfg), strategy(cfg), *cfg.logger.tags],
        },
        launcher={
            "name": cfg.launcher.name.value,
            "nproc_per_node": nproc_per_node(cfg, gpus),
            "nnodes": cfg.launcher.nnodes if cfg.launcher.name.value != "slurm" else cfg.launcher.slurm.nodes,
            "node_rank": cfg.launcher.node_rank,
            "rdzv_endpoint": cfg.launcher.rdzv_endpoint,
            "rdzv_id": cfg.launcher.rdzv_id,
        },
        versions=package_versions(cfg),
    )


def _model_spec(cfg: Any, dtype: str) -> Dict[str, Any]:
    source = cfg.model.name_or_path
    if source is None:
        from trainer.tiny import tiny_model_dir

        source = f"embedded tiny model (built once into {tiny_model_dir(cfg.model.tiny)})"
    return {
        "preset": cfg.model.preset,
        "source": source,
        "dtype": dtype,
        "adapters": list(cfg.model.adapters),
        "trust_remote_code": bool(cfg.model.trust_remote_code),
        "attn_implementation": cfg.model.attn_implementation,
        "upcast_layernorm": bool(cfg.model.upcast_layernorm),
        "gradient_checkpointing": bool(cfg.train.gradient_checkpointing),
        "checkpoint_layers": cfg.train.checkpoint_layers if cfg.train.checkpoint_layers is not None else "all",
        # Skipped where the strategy shards lm_head (its weight is a DTensor / ZeRO partition there).
        "fused_cross_entropy": bool(cfg.train.fused_ce) and strategy(cfg) not in NO_FUSED_CE_STRATEGIES,
        "fused_lora": _fused_lora(cfg),
        "liger": "auto (CUDA and liger-kernel present)" if cfg.model.liger is None else bool(cfg.model.liger),
    }


def _fused_lora(cfg: Any) -> Any:
    if not uses_fused_lora(cfg):
        return False
    return True if cfg.train.fused_lora else "auto (when batch x seq x hidden >= 2**25)"


def _quant_spec(cfg: Any, dtype: str) -> Dict[str, Any]:
    name = method(cfg)
    if name == "none":
        return {"method": "none"}
    backend = backend_for(name)
    spec: Dict[str, Any] = {
        "method": name,
        "bits": cfg.quant.bits,
        "backend": backend.summary,
        "pre_quantized": backend.pre_quantized,
        "compute_dtype": dtype,
    }
    if name == "bnb":
        from trainer.quant.bnb import quantization_kwargs

        spec["bitsandbytes_config"] = quantization_kwargs(cfg, dtype)
    elif name == "hqq":
        spec["group_size"] = cfg.quant.group_size
    return spec


def _peft_spec(cfg: Any) -> Dict[str, Any]:
    from trainer.adapters import adapter_kwargs

    return {"method": peft_method(cfg), **adapter_kwargs(cfg)}


def checkpointing_argument() -> str:
    """TrainingArguments' name for activation checkpointing in the installed transformers.

    transformers 5.23 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and warns on
    the old names; read from the installed version's metadata, so the plan stays torch-free.
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        renamed = Version(version("transformers")) >= Version("5.23.0")
    except PackageNotFoundError:
        renamed = False
    return "activation_checkpointing" if renamed else "gradient_checkpointing"


def training_args(cfg: Any, run_dir: str, device: str, dtype: str, strat: Dict[str, Any]) -> Dict[str, Any]:
    """Keyword arguments for transformers.TrainingArguments, as plain values."""
    t = cfg.train
    checkpointing = checkpointing_argument()
    args: Dict[str, Any] = {
        "output_dir": os.path.join(run_dir, "checkpoints"),
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.eval_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.scheduler.value,
        "warmup_steps": t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "max_steps": t.max_steps,
        "num_train_epochs": t.num_epochs,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if cfg.do_eval else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": None,  # qforge rotates complete checkpoints only (trainer/checkpoints.py)
        "optim": t.optim,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
        "use_cpu": device == "cpu",
        checkpointing: bool(t.gradient_checkpointing),
        f"{checkpointing}_kwargs": {"use_reentrant": False},
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "report_to": [],
        "disable_tqdm": False,
        "logging_first_step": True,
        "include_num_input_tokens_seen": "non_padding",
    }
    args.update(strat.get("training_args", {}))
    return args
