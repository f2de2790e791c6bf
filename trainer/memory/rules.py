"""The memory rules: a composition whose predicted peak exceeds the target GPU's memory is refused, one within
10% warned, and train.checkpoint_layers / gpu_mem_gib values checked. Gathered by trainer/validate.py."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from trainer.memory import (
    GIB,
    Inputs,
    Prediction,
    embeddings_reason,
    fixes,
    predict,
    predict_inputs,
    predict_with_inputs,
    valid_checkpoint_layers,
    valid_offload_layers,
)
from trainer.memory.host import HOST_SHARE, host_target, ranks_per_node
from trainer.rules import error, warning

#
# Each memory rule asks the same question of the same config; predict_inputs() is cached on the resolved
# inputs, so validate() computes one prediction per composition however many rules read it.

def _does_not_fit(cfg: Any) -> bool:
    return predict(cfg).fits is False


def _tight(cfg: Any) -> bool:
    return predict(cfg).tight


def _unknown(cfg: Any) -> bool:
    p = predict(cfg)
    return not p.known and p.target_gib is not None


def _details(cfg: Any) -> Dict[str, Any]:
    """The computed fields of the memory rules' sentences (called only when a rule fires)."""
    p, x = predict_with_inputs(cfg)
    cal = p.calibration
    phase = p.peak_phase
    return {
        "needed": f"{p.needed_bytes / GIB:.1f}",
        "peak": f"{p.peak_bytes / GIB:.1f}",
        "phase": phase.name if phase else "?",
        "overhead": f"{cal.allocator_overhead:.0%}",
        "context": f"{cal.cuda_context_gib:g}",
        "target": f"{p.target_gib:g}" if p.target_gib is not None else "?",
        "source": p.target_source,
        "largest": ", ".join(f"{t.name} {t.gib:.1f} GiB" for t in p.largest(3)),
        "fixes": _fixes_or_why(p, x),
        "reason": p.reason,
    }


def _fixes_or_why(p: Prediction, x: Optional[Inputs]) -> str:
    if not p.known or x is None:
        return ""
    try:
        return fixes(p, x)
    except Exception as err:  # noqa: BLE001  (a validator never crashes; the random-composition test looks)
        return f"no fixes computed (internal error in trainer.memory: {type(err).__name__}: {err})"


def _host_does_not_fit(cfg: Any) -> bool:
    """train.offload_activations / train.embeddings_on_host: the node's processes together pin more than HOST_SHARE
    of its memory."""
    p = predict(cfg)
    if not p.known or not p.host_bytes:
        return False
    target, _ = host_target(cfg)
    return target is not None and p.host_bytes * ranks_per_node(cfg) > HOST_SHARE * target * GIB


def _host_details(cfg: Any) -> Dict[str, Any]:
    p, x = predict_with_inputs(cfg)
    target, source = host_target(cfg)
    ranks = ranks_per_node(cfg)
    # With every layer checkpointed only the layer inputs go to the host.
    inputs_only = predict_inputs(dataclasses.replace(x, gradient_checkpointing=True, checkpoint_layers=None,
                                                     offload_layers=None, embeddings_on_host=False)).host_bytes \
        if x else 0.0
    train = cfg.train
    checkpoint_all = "train.offload_activations=true" if train.offload_activations is None else \
        "train.checkpoint_layers=null" + \
        (" train.offload_layers=null" if train.offload_layers is not None else "") + \
        ("" if train.gradient_checkpointing else " train.gradient_checkpointing=true")
    table = p.host_bytes - predict_inputs(dataclasses.replace(x, embeddings_on_host=False)).host_bytes if x else 0.0
    offload_name = "train.offload_activations" + ("=true" if train.offload_activations else " (on by default)")
    pinning = [name for name, on in ((offload_name, p.offload_activations),
                                     ("train.embeddings_on_host", p.embeddings_on_host)) if on]
    moves = []
    if p.offload_activations:
        moves.append(f"set {checkpoint_all} (only the layer inputs go to the host: {inputs_only / GIB:.1f} GiB per "
                     "GPU) or train.offload_activations=false")
    if p.embeddings_on_host:
        moves.append(f"set train.embeddings_on_host=false (its {table / GIB:.1f} GiB go back to the GPU)")
    return {
        "pinning": " and ".join(pinning),
        "moves": "; or ".join(moves),
        "per_gpu": f"{p.host_bytes / GIB:.1f}",
        "total": f"{p.host_bytes * ranks / GIB:.1f}",
        "ranks": ranks,
        "share": f"{HOST_SHARE:.0%}",
        "target": f"{target:g}" if target is not None else "?",
        "source": source,
    }


def _offload_layers_problem(cfg: Any) -> str:
    """What is wrong with train.offload_layers, or "" (null is always fine)."""
    train = cfg.train
    value = train.offload_layers
    if value is None:
        return ""
    if not valid_offload_layers(value):
        return f"train.offload_layers must be null or a number of layers, not {value}"
    if not train.offload_activations:
        return "train.offload_layers says how many layers offload their activations, and train.offload_activations " \
               "is not true"
    if train.gradient_checkpointing and train.checkpoint_layers == "auto":
        return "train.checkpoint_layers=auto chooses how many layers offload as well, so " \
               f"train.offload_layers={value} cannot be honoured beside it"
    if train.gradient_checkpointing and train.checkpoint_layers is None:
        return "every decoder layer is checkpointed (train.checkpoint_layers=null), so no layer is left to " \
               "offload whole"
    p = predict(cfg)
    checkpointing = train.gradient_checkpointing and valid_checkpoint_layers(train.checkpoint_layers)
    checkpointed = int(train.checkpoint_layers) if checkpointing else 0
    plain = max(p.layers - checkpointed, 0)
    if p.known and value > plain:
        why = f"train.checkpoint_layers={checkpointed}" if checkpointing else "gradient checkpointing is off"
        return f"train.offload_layers={value} is more than the {plain} layers of {p.layers} that are not " \
               f"checkpointed ({why})"
    return ""


def _bad_host_mem(cfg: Any) -> bool:
    value = cfg.train.host_mem_gib
    return value is not None and not value > 0


def _bad_gpu_mem(cfg: Any) -> bool:
    return any(v is not None and not v > 0 for v in (cfg.train.gpu_mem_gib, cfg.launcher.slurm.gpu_mem_gib))


def _embeddings_reason(cfg: Any) -> str:
    """Why train.embeddings_on_host=true cannot apply to this run, or "" (it can, or it was not asked for)."""
    if cfg.train.embeddings_on_host is not True:
        return ""
    _, x = predict_with_inputs(cfg)
    if x is None or x.device != "cuda":  # a CPU run is refused by the plan, with its own sentence
        return ""
    return embeddings_reason(x) or ""


MEMORY_GROUPS = ["model", "quant", "peft", "strategy", "train", "launcher"]

RULES = [
    error(
        "train.checkpoint_layers",
        ["train"],
        lambda cfg: not valid_checkpoint_layers(cfg.train.checkpoint_layers),
        "train.checkpoint_layers must be null (every layer), a number of layers or auto, "
        "not {cfg.train.checkpoint_layers}.",
        "set train.checkpoint_layers=null, a number such as 8 (the first 8 decoder layers are checkpointed), "
        "or auto (the fewest that fit the GPU's memory).",
    ),
    error(
        "train.offload_layers",
        ["train", "model"],
        lambda cfg: bool(_offload_layers_problem(cfg)),
        "{problem}.",
        "set train.offload_layers=null (every un-checkpointed layer offloads), or give it with "
        "train.offload_activations=true and a number for train.checkpoint_layers, e.g. train.checkpoint_layers=8 "
        "train.offload_layers=12 (8 recompute, 12 offload, the rest keep their activations).",
        details=lambda cfg: {"problem": _offload_layers_problem(cfg)},
    ),
    error(
        "train.gpu_mem_gib",
        ["train", "launcher"],
        _bad_gpu_mem,
        "GPU memory must be a positive number of GiB, not train.gpu_mem_gib={cfg.train.gpu_mem_gib} / "
        "launcher.slurm.gpu_mem_gib={cfg.launcher.slurm.gpu_mem_gib}.",
        "set it to the memory of one GPU, e.g. train.gpu_mem_gib=80, or leave it null.",
    ),
    error(
        "train.host_mem_gib",
        ["train"],
        _bad_host_mem,
        "host memory must be a positive number of GiB, not train.host_mem_gib={cfg.train.host_mem_gib}.",
        "set it to the memory of one node, e.g. train.host_mem_gib=512, or leave it null.",
    ),
    error(
        "train.embeddings_on_host",
        ["train", "model", "peft", "strategy"],
        lambda cfg: bool(_embeddings_reason(cfg)),
        "train.embeddings_on_host=true cannot apply to this run: {reason}.",
        "set train.embeddings_on_host=null (the table moves to host memory wherever that applies) or false.",
        details=lambda cfg: {"reason": _embeddings_reason(cfg)},
    ),
    error(
        "memory.host_offload",
        MEMORY_GROUPS,
        _host_does_not_fit,
        "{pinning} keep(s) {per_gpu} GiB per GPU in pinned host memory, {total} GiB for the "
        "{ranks} process(es) of a node, more than {share} of its {target} GiB of host memory ({source}).",
        "{moves}; train.host_mem_gib=N if the node that trains has more.",
        details=_host_details,
    ),
    error(
        "memory.fits",
        MEMORY_GROUPS,
        _does_not_fit,
        "the predicted peak is {needed} GiB per GPU ({peak} GiB allocated at {phase} + {overhead} allocator "
        "overhead + {context} GiB CUDA context), more than the {target} GiB GPU ({source}); largest terms: "
        "{largest}.",
        "{fixes} (python -m trainer.memory <the same overrides> shows the breakdown).",
        details=_details,
    ),
    warning(
        "memory.tight",
        MEMORY_GROUPS,
        _tight,
        "the predicted peak, {needed} GiB per GPU ({peak} GiB allocated at {phase}), is within 10% of the "
        "{target} GiB GPU ({source}), so fragmentation or a longer batch can push it over.",
        "{fixes} (python -m trainer.memory <the same overrides> shows the breakdown).",
        details=_details,
    ),
    warning(
        "memory.unknown",
        ["model", "train", "launcher"],
        _unknown,
        "the run's peak memory was not compared with the {target} GiB GPU ({source}): the model's shape is "
        "{reason}.",
        "point model.name_or_path at a local directory holding the model's config.json.",
        details=_details,
    ),
]


