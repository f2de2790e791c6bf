"""Rules on how a run is launched: torchrun's process layout and the Slurm job's settings.

They judge the composed config like every other rule (listed in docs/compatibility.md); what sbatch would
reject, or silently misread, is refused here, in a dry run too, before any script is rendered.
"""

from __future__ import annotations

import re
from typing import Any

from trainer.preemption import signal_name
from trainer.rules import error

# A Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
SLURM_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")


def _launcher(cfg: Any) -> str:
    return cfg.launcher.name.value


def _bad_nproc(cfg: Any) -> bool:
    value = str(cfg.launcher.nproc_per_node)
    return value != "auto" and not (value.isdigit() and int(value) > 0)


def _slurm(cfg: Any) -> bool:
    return _launcher(cfg) == "slurm"


def _bad_extra(cfg: Any) -> list:
    return [str(o) for o in cfg.launcher.slurm.extra if not str(o).startswith("-")]


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
        lambda cfg: _launcher(cfg) == "torchrun" and cfg.launcher.nnodes > 1 and not cfg.launcher.rdzv_endpoint,
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
    error(
        "slurm.sizes",
        ["launcher"],
        lambda cfg: _slurm(cfg) and (cfg.launcher.slurm.nodes < 1 or cfg.launcher.slurm.gpus_per_node < 0
                                     or cfg.launcher.slurm.cpus_per_task < 1),
        "launcher.slurm needs nodes>=1, gpus_per_node>=0, cpus_per_task>=1 (got nodes={cfg.launcher.slurm.nodes}, "
        "gpus_per_node={cfg.launcher.slurm.gpus_per_node}, cpus_per_task={cfg.launcher.slurm.cpus_per_task}).",
        "set them to positive counts (gpus_per_node=0 for a CPU-only job).",
    ),
    error(
        "slurm.time",
        ["launcher"],
        lambda cfg: _slurm(cfg) and not SLURM_TIME.match(str(cfg.launcher.slurm.time)),
        "launcher.slurm.time={cfg.launcher.slurm.time} is not a Slurm time limit.",
        "use minutes, HH:MM:SS or D-HH:MM:SS, e.g. launcher.slurm.time=04:00:00.",
    ),
    error(
        "slurm.signal",
        ["launcher"],
        lambda cfg: _slurm(cfg) and signal_name(str(cfg.launcher.slurm.signal)) is None,
        "launcher.slurm.signal={cfg.launcher.slurm.signal} is not SIGNAL@SECONDS with a known signal.",
        "use e.g. launcher.slurm.signal=USR2@120 (USR2 because NCCL may use USR1).",
    ),
    error(
        "slurm.extra",
        ["launcher"],
        lambda cfg: _slurm(cfg) and bool(_bad_extra(cfg)),
        "launcher.slurm.extra holds {options}, which are not sbatch options.",
        "list sbatch options with their dashes, e.g. launcher.slurm.extra=[--exclusive].",
        details=lambda cfg: {"options": ", ".join(f"'{o}'" for o in _bad_extra(cfg))},
    ),
]
