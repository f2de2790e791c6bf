"""Deciding: build_plan turns a validated composition into the RunPlan (trainer/specs.py), without torch.

This is the boundary between deciding and doing. `dry_run=true` prints the plan and stops; the launcher writes
it to RUN_DIR/.hydra/plan.json and every rank reads that file back (trainer/rank.py) and trains from it.
Nothing past this module reads the composed config, and nothing downstream re-derives a setting the plan
decided: a new decision is added here. (Ranks do not even import this module: they only read the plan.)
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, Optional

from trainer import families
from trainer.adapters import peft_spec
from trainer.data.spec import data_spec
from trainer.env import accelerators
from trainer.errors import UserError
from trainer.layout import nproc_per_node, resolve_compute_dtype, world_size
from trainer.memory import predict
from trainer.preemption import signal_name
from trainer.preflight import package_versions, requirements
from trainer.quant import backend_for
from trainer.rules import method, peft_method, strategy
from trainer.specs import (
    LauncherSpec,
    LoggerSpec,
    ModelSpec,
    QuantSpec,
    RequirementSpec,
    RunPlan,
    RunSpec,
)
from trainer.speed import speed_spec
from trainer.strategies import StrategySpec, chosen

__all__ = ["RunPlan", "build_plan"]

# ---- deciding ----

def default_run_dir(cfg: Any, now: Optional[_dt.datetime] = None) -> str:
    """A fresh dir per run: timestamp, the composition, and a random suffix.

    Two runs started in the same second (hydra #1607) still get different dirs.
    """
    now = now or _dt.datetime.now()
    tag = f"{cfg.quant.method.value}{cfg.quant.bits or ''}-{peft_method(cfg)}-{strategy(cfg)}"
    suffix = secrets.token_hex(3)
    return os.path.join(cfg.output_root, now.strftime("%Y-%m-%d"), f"{now:%H-%M-%S}-{tag}-{suffix}")


def build_plan(cfg: Any, run_dir: Optional[str] = None) -> RunPlan:
    slurm = cfg.launcher.name.value == "slurm"
    acc = accelerators()
    # On Slurm the plan is made on a login node for the allocation's GPUs (launcher.slurm.gpus_per_node).
    gpus = cfg.launcher.slurm.gpus_per_node if slurm else acc.gpus
    bf16 = True if slurm else acc.bf16
    dtype = resolve_compute_dtype(cfg, gpus, bf16)
    device = "cuda" if gpus > 0 else "cpu"
    if cfg.train.offload_activations and device == "cpu":
        raise UserError("train.offload_activations=true moves what the layers keep for backward from GPU memory to "
                        "host memory, and this run trains on CPU, where they already are; set "
                        "train.offload_activations=false (or run on a GPU machine).")
    if cfg.train.embeddings_on_host and device == "cpu":
        raise UserError("train.embeddings_on_host=true moves the embedding table from GPU memory to host memory, and "
                        "this run trains on CPU, where it already is; set train.embeddings_on_host=null (or run on "
                        "a GPU machine).")
    run_dir = os.path.abspath(os.path.expanduser(run_dir or cfg.run_dir or default_run_dir(cfg)))
    size = world_size(cfg, gpus)
    model = _model_spec(cfg, dtype, device)
    strat = chosen(cfg).plan(cfg, device=device, compute_dtype=dtype, world_size=size,
                             decoder_layer=families.DECODER_LAYERS[model.family])
    memory = predict(cfg)
    # train.offload_activations=null: the memory model turned it on, with its own split, where it applies.
    by_default = device == "cuda" and memory.known and memory.offload_by_default
    checkpoint_layers = memory.checkpoint_layers if by_default else _checkpoint_layers(cfg, memory)
    speed = speed_spec(cfg, checkpoint_layers=checkpoint_layers,
                       offload_layers=None if by_default else _offload_layers(cfg, memory),
                       embeddings_on_host=device == "cuda" and memory.known and memory.embeddings_on_host,
                       offload_activations=bool(cfg.train.offload_activations) or by_default)
    return RunPlan(
        run_dir=run_dir,
        run_name=cfg.run_name or os.path.basename(run_dir),
        device=device,
        world_size=size,
        compute_dtype=dtype,
        model=model,
        quant=_quant_spec(cfg, device, dtype),
        peft=peft_spec(cfg),
        strategy=strat,
        data=data_spec(cfg),
        speed=speed,
        run=RunSpec(
            do_train=bool(cfg.do_train),
            do_eval=bool(cfg.do_eval),
            seed=int(cfg.seed),
            output_root=os.path.abspath(os.path.expanduser(str(cfg.output_root))),
            resume=str(cfg.train.resume),
            save_total_limit=int(cfg.train.save_total_limit),
            callbacks=[str(c) for c in cfg.train.callbacks],
            eval_samples=int(cfg.eval.samples),
            eval_max_new_tokens=int(cfg.eval.max_new_tokens),
        ),
        training_args=training_args(cfg, run_dir, device, dtype, strat),
        logger=LoggerSpec(
            name=cfg.logger.name.value,
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            mode=cfg.logger.mode.value,
            tags=[cfg.quant.method.value, peft_method(cfg), strategy(cfg), *cfg.logger.tags],
        ),
        launcher=LauncherSpec(
            name=cfg.launcher.name.value,
            nproc_per_node=nproc_per_node(cfg, gpus),
            nnodes=cfg.launcher.slurm.nodes if slurm else cfg.launcher.nnodes,
            node_rank=cfg.launcher.node_rank,
            rdzv_endpoint=cfg.launcher.rdzv_endpoint,
            rdzv_id=cfg.launcher.rdzv_id,
            preemption_signal=signal_name(str(cfg.launcher.slurm.signal)),
            slurm=_slurm_settings(cfg) if slurm else None,
        ),
        memory=memory.to_dict(),
        requirements=[RequirementSpec(asked_by, r.module, r.distribution, r.minimum, r.install, r.needs_gpu)
                      for asked_by, r in requirements(cfg)],
        versions=package_versions(cfg),
    )


def _checkpoint_layers(cfg: Any, memory: Any) -> Optional[int]:
    """train.checkpoint_layers as a number of layers (None: every layer); auto is the memory model's choice."""
    value = cfg.train.checkpoint_layers
    if value != "auto":
        return None if value is None else int(value)
    return memory.checkpoint_layers if memory.known else None


def _offload_layers(cfg: Any, memory: Any) -> Optional[int]:
    """train.offload_layers as a number (None: every un-checkpointed layer); with checkpoint_layers=auto, the
    memory model's choice."""
    if not cfg.train.offload_activations:
        return None
    if cfg.train.checkpoint_layers == "auto":
        return memory.offload_layers if memory.known else None
    value = cfg.train.offload_layers
    return None if value is None else int(value)


def _model_spec(cfg: Any, dtype: str, device: str) -> ModelSpec:
    m = cfg.model
    tiny = None
    if m.name_or_path is None:
        from trainer.tiny import arch_dict, tiny_model_dir

        tiny = arch_dict(m.tiny)
        source = str(tiny_model_dir(tiny))
    else:
        source = str(m.name_or_path)
        expanded = os.path.expanduser(source)
        source = os.path.abspath(expanded) if os.path.exists(expanded) else source
    family = families.resolve(m.family.value, source if tiny is None else None)
    if m.device_map is not None:
        device_map: Optional[str] = "auto"
    else:
        device_map = chosen(cfg).device_map(device, quantized=method(cfg) != "none")
    return ModelSpec(
        preset=m.preset,
        source=source,
        tiny=tiny,
        family=family,
        decoder_layer=families.DECODER_LAYERS[family],
        dtype=dtype,
        adapters=[os.path.abspath(os.path.expanduser(str(a))) if os.path.exists(os.path.expanduser(str(a)))
                  else str(a) for a in m.adapters],
        new_adapter=bool(m.new_adapter),
        resize_vocab=bool(m.resize_vocab),
        device_map=device_map,
        trust_remote_code=bool(m.trust_remote_code),
        attn_implementation=m.attn_implementation,
        upcast_layernorm=bool(m.upcast_layernorm),
    )


def _quant_spec(cfg: Any, device: str, dtype: str) -> QuantSpec:
    backend = backend_for(method(cfg))
    return QuantSpec(
        method=backend.method,
        bits=cfg.quant.bits,
        backend=backend.summary,
        pre_quantized=backend.pre_quantized,
        trains_quantized=backend.trains_quantized,
        loader=backend.loader,
        load_kwargs=backend.load_kwargs(cfg, device, dtype),
    )


def _slurm_settings(cfg: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.launcher.slurm, resolve=True)  # type: ignore[return-value]


def checkpointing_argument() -> str:
    """TrainingArguments' name for activation checkpointing in the installed transformers.

    transformers 5.23 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and warns on
    the old names; read from the installed version's metadata, so the plan stays torch-free.
    """
    from packaging.version import Version

    try:
        renamed = Version(version("transformers")) >= Version("5.23.0")
    except PackageNotFoundError:
        renamed = False
    return "activation_checkpointing" if renamed else "gradient_checkpointing"


def training_args(cfg: Any, run_dir: str, device: str, dtype: str, strat: StrategySpec) -> Dict[str, Any]:
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
        # The eval before training runs inside train(), once the strategy has wrapped the model:
        # transformers 5.17 / accelerate 1.15 never wrap a model in DDP once Trainer.evaluate() has prepared
        # it for evaluation, so an evaluate() first made every DDP rank train on its own. (A resumed attempt
        # skips it: trainer/run.py.)
        "eval_on_start": bool(cfg.do_eval and cfg.do_train),
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": None,  # qforge rotates complete checkpoints only (trainer/checkpoints.py)
        "optim": t.optim.value,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": dtype == "bfloat16",
        "fp16": dtype == "float16",
        "use_cpu": device == "cpu",
        checkpointing: bool(t.gradient_checkpointing),
        f"{checkpointing}_kwargs": {"use_reentrant": False},
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        # Pinned host memory only speeds copies to a GPU; on CPU torch warns that it does nothing (FSDP and ZeRO on
        # gloo turn use_cpu off, so the Trainer would still ask for it).
        "dataloader_pin_memory": device != "cpu",
        "report_to": [],
        "disable_tqdm": False,
        "logging_first_step": True,
        "include_num_input_tokens_seen": "non_padding",
        # Its isnan/isinf check made the CPU wait for every backward to finish (trainer/step_syncs.py); a NaN or inf
        # step loss now shows in the logged loss instead of being averaged away.
        "logging_nan_inf_filter": False,
    }
    args.update(strat.training_args)
    if cfg.data.streaming:
        # accelerate's default for an iterable dataset is rank 0 reading every batch and sending each rank its
        # part, which needs every rank's batch padded to one length (accelerate 1.15 fails on packed rows of
        # different lengths). Each rank reads the stream itself instead and keeps its own share of the rows
        # (accelerate's IterableDatasetShard): the same rows in the same order as the dispatched split.
        args["accelerator_config"] = {**args.get("accelerator_config", {}), "dispatch_batches": False}
    return args
