"""How many processes a run is and what dtype it computes in: decided from the composition and the machine.

Torch-free; shared by the plan (trainer/plan.py) and the memory model (trainer/memory/), which must agree.
"""

from __future__ import annotations

from typing import Any


def resolve_compute_dtype(cfg: Any, gpus: int, bf16: bool) -> str:
    chosen_dtype = cfg.quant.compute_dtype.value
    if chosen_dtype != "auto":
        return chosen_dtype
    if gpus == 0:
        return "float32"  # CPU kernels for bf16 matmul are slow and bnb's CPU path expects fp32
    return "bfloat16" if bf16 else "float16"


def nproc_per_node(cfg: Any, gpus: int) -> int:
    value = str(cfg.launcher.nproc_per_node)
    if value == "auto":
        return max(gpus, 1)
    return int(value)


def ranks_per_node(cfg: Any, gpus: int) -> int:
    """Processes on one node: one in-process, one per GPU under torchrun or Slurm."""
    launcher = cfg.launcher.name.value
    if launcher == "local":
        return 1
    if launcher == "slurm":
        return max(cfg.launcher.slurm.gpus_per_node, 1)
    return nproc_per_node(cfg, gpus)


def world_size(cfg: Any, gpus: int) -> int:
    launcher = cfg.launcher.name.value
    if launcher == "local":
        return 1
    nodes = cfg.launcher.slurm.nodes if launcher == "slurm" else cfg.launcher.nnodes
    return nodes * ranks_per_node(cfg, gpus)
