"""How each strategy maps onto the HF Trainer, accelerate and DeepSpeed: resolved into the plan."""

from __future__ import annotations

import os
from typing import Any, Dict

from trainer.errors import UserError
from trainer.rules import error, peft_method, strategy


def _torchrun(cfg: Any) -> bool:
    return cfg.launcher.name.value == "torchrun"


def _bad_nproc(cfg: Any) -> bool:
    value = str(cfg.launcher.nproc_per_node)
    return value != "auto" and not (value.isdigit() and int(value) > 0)


# Launcher rules live here, beside the torchrun arguments they protect (launchers.torchrun.torchrun_argv).
RULES = [
    error(
        "launcher.nproc_per_node",
        ["launcher"],
        _bad_nproc,
        "launcher.nproc_per_node must be auto or a positive number of processes, not {cfg.launcher.nproc_per_node}.",
        "set launcher.nproc_per_node=auto (one per visible GPU, 1 without GPUs) or e.g. launcher.nproc_per_node=2.",
    ),
    error(
        "launcher.multinode_rendezvous",
        ["launcher"],
        lambda cfg: _torchrun(cfg) and cfg.launcher.nnodes > 1 and not cfg.launcher.rdzv_endpoint,
        "launcher.nnodes={cfg.launcher.nnodes} needs a rendezvous point the nodes can all reach.",
        "set launcher.rdzv_endpoint=<head node>:29500 and the same launcher.rdzv_id on every node "
        "(c10d numbers the nodes itself), or launcher=slurm, which finds the head node for you.",
    ),
    error(
        "launcher.nnodes",
        ["launcher"],
        lambda cfg: cfg.launcher.nnodes < 1 or cfg.launcher.node_rank < 0 or cfg.launcher.node_rank >= max(
            cfg.launcher.nnodes, 1),
        "launcher.node_rank={cfg.launcher.node_rank} is not a node of launcher.nnodes={cfg.launcher.nnodes}.",
        "set launcher.nnodes to at least 1 and launcher.node_rank between 0 and nnodes-1.",
    ),
]

DECODER_LAYER_CLASSES = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
}


def resolve(cfg: Any, device: str, compute_dtype: str, world_size: int) -> Dict[str, Any]:
    name = strategy(cfg)
    spec: Dict[str, Any] = {
        "name": name,
        "world_size": world_size,
        "dist_backend": "nccl" if device == "cuda" else "gloo",
    }
    adapters_only = peft_method(cfg) not in ("full", "freeze")
    if name == "ddp":
        # With adapters every trainable parameter gets a gradient each step; searching for unused
        # ones costs a graph walk per step for nothing.
        spec["training_args"] = {"ddp_find_unused_parameters": not adapters_only,
                                 "ddp_backend": spec["dist_backend"]}
    elif name == "fsdp":
        if device == "cpu" and cfg.strategy.version == 1:
            raise UserError("strategy=fsdp strategy.version=1 needs GPUs (accelerate prepares FSDP1 only on an "
                            "accelerator); on CPU use strategy.version=2, torch's fully_shard, which runs on gloo.")
        spec["fsdp_config"] = fsdp_config(cfg)
        # fsdp=True: everything else is in fsdp_config (transformers deprecates the option string).
        spec["training_args"] = {"fsdp": True, "fsdp_config": spec["fsdp_config"],
                                 "ddp_backend": spec["dist_backend"]}
    elif name in ("zero2", "zero3", "zero3_offload"):
        spec["deepspeed_config"] = deepspeed_config(cfg, compute_dtype)
        spec["training_args"] = {"ddp_backend": spec["dist_backend"]}
    if world_size < 2:
        # One process (launcher=local; the strategy.one_process rule warns): no process group to name a
        # backend for, and FSDP has nothing to shard with (the Trainer refuses it outside torch.distributed).
        # DeepSpeed still runs on one GPU (training_arguments passes its config).
        spec["training_args"] = {}
    if device == "cpu" and name in SHARDED_ON_CPU and world_size > 1:
        # accelerate turns FSDP and DeepSpeed off when told use_cpu; on a machine without GPUs the
        # device is the CPU anyway, and torch's fully_shard and DeepSpeed's CPU accelerator run on gloo.
        spec["training_args"]["use_cpu"] = False
        # The gloo process group is set up before TrainingArguments (prepare_process_group); keep it.
        spec["training_args"]["accelerator_config"] = {"use_configured_state": True}
    return spec


SHARDED_ON_CPU = ("fsdp", "zero2", "zero3", "zero3_offload")


def fsdp_config(cfg: Any) -> Dict[str, Any]:
    layer = DECODER_LAYER_CLASSES.get(cfg.model.family, "LlamaDecoderLayer")
    version = int(cfg.strategy.version)
    config: Dict[str, Any] = {
        "fsdp_version": version,
        "transformer_layer_cls_to_wrap": [layer],
        # FSDP2 takes a bool; FSDP1 names the sharding strategy.
        "reshard_after_forward": True if version == 2 else "full_shard",
        "cpu_ram_efficient_loading": False,
        # Sharded during training (each rank writes its part); save_final gathers a full adapter at the end.
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_offload": bool(cfg.strategy.offload_params),
        "activation_checkpointing": False,
    }
    if version == 1:
        # Adapters leave frozen and trainable parameters in one wrapped unit; FSDP1 flattens a unit
        # into one tensor unless it keeps the original parameters.
        config["use_orig_params"] = True
    return config


def deepspeed_config(cfg: Any, compute_dtype: str) -> Dict[str, Any]:
    name = strategy(cfg)
    stage = 2 if name == "zero2" else 3
    offload = name == "zero3_offload" or cfg.strategy.offload_params
    zero: Dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Adapters and full weights are saved as one 16-bit file, not as ZeRO shards.
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if offload or cfg.strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": compute_dtype == "bfloat16"},
        "fp16": {"enabled": compute_dtype == "float16"},
        "zero_optimization": zero,
    }


# ---- at run time (torch imported): what each rank does with the resolved spec ----

DEEPSPEED_FILE = "deepspeed.json"
FIXED_LOGITS_FILE = "final_logits.safetensors"
# A fixed probe: the trained model's logits on it are saved so a reloaded adapter can be checked.
FIXED_PROBE = "### Instruction:\nName three primary colors.\n\n### Response:\n"


def training_arguments(plan: Any) -> Dict[str, Any]:
    """TrainingArguments kwargs; the DeepSpeed config is written into the run dir and passed by path."""
    import json
    import os

    kwargs = dict(plan.training_args)
    ds = plan.strategy.get("deepspeed_config")
    # One CPU process: accelerate runs DeepSpeed only on accelerators or across ranks; train plainly.
    if ds is not None and not (plan.device == "cpu" and plan.world_size < 2):
        path = os.path.join(plan.run_dir, DEEPSPEED_FILE)
        # Every rank writes the same bytes; a unique temp name and an atomic rename keep readers whole.
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(ds, f, indent=2)
        os.replace(tmp, path)
        kwargs["deepspeed"] = path
    return kwargs


def save_final(trainer: Any, target: str) -> None:
    """Save the adapter (or model) as one full, loadable copy. Collective: every rank calls it.

    FSDP checkpoints during training are sharded; the final save gathers a full state dict instead.
    ZeRO-3 gathers 16-bit weights (stage3_gather_16bit_weights_on_model_save in the config).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(target)


def save_fixed_logits(trainer: Any, tokenizer: Any, path: str) -> None:
    """Run the trained model on FIXED_PROBE on every rank (sharded weights need all of them); rank 0 saves."""
    import torch
    from safetensors.torch import save_file

    model = trainer.model
    ids = tokenizer(FIXED_PROBE, return_tensors="pt")["input_ids"].to(trainer.args.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    model.train(was_training)
    if trainer.is_world_process_zero():
        save_file({"input_ids": ids.cpu(), "logits": logits.contiguous()}, path)


def prepare_process_group(plan: Any) -> None:
    """FSDP and DeepSpeed on CPU: start the gloo process group the way accelerate would on GPUs.

    accelerate builds its FSDP plugin only for accelerator process groups (MULTI_GPU and kin, see
    accelerate/state.py), and for DeepSpeed it picks no backend at all when there is no GPU, so the
    run silently trains as world size 1. torch's fully_shard and DeepSpeed's CPU accelerator both run
    on gloo, so the (process-wide, singleton) state is created here, before TrainingArguments, which
    keeps it (accelerator_config.use_configured_state). The device stays the CPU.
    """
    name = plan.strategy["name"]
    if plan.device != "cpu" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    # accelerate names each CPU rank's device "cpu:<rank>", and the Trainer's resume then fails in
    # torch.load(map_location="cpu:0") ("don't know how to restore data location"). One CPU is "cpu".
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    if name not in SHARDED_ON_CPU:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if name == "fsdp":
        state = PartialState(backend="gloo")
        if state.distributed_type == DistributedType.NO and state.num_processes > 1:
            state.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState turns it into FSDP
        return
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around its own init
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def memory_callback(metrics: Dict[str, Any]) -> Any:
    """Record per-GPU memory once the strategy has wrapped (sharded) the model, before the first step.

    That figure is the weights (+ adapters) each GPU holds: FSDP and ZeRO-3 shards show up as a fraction
    of the single-GPU figure. Written into `metrics` as weights_memory_bytes (0 on CPU).
    """
    from transformers import TrainerCallback

    class WeightMemory(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                metrics["weights_memory_bytes"] = int(torch.cuda.memory_allocated())

    return WeightMemory()
