"""Host memory for train.offload_activations: every process of a node keeps its pinned buffers in that node's RAM.

The memory model predicts the pinned bytes per GPU (Prediction.host_bytes); this module says what they are
checked against (train.host_mem_gib, or what this machine has available when the run trains here) and how many
processes share one node. Pinned memory cannot be swapped: a node that runs out of it kills processes rather
than slowing down, so a run that would not fit is refused before it starts.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

# trainer.memory reads this module for the host budget of auto's split, so the unit is not imported from there
GIB = 2**30

# The share of the host's memory pinned buffers may take; the rest is the data loader's, the page cache's and
# the processes' own.
HOST_SHARE = 0.9


# The share of available host memory train.offload_activations=null may pin before it leaves offload off: a
# default takes less than an explicit setting may (HOST_SHARE), so the data loader and the user's other processes
# keep room.
DEFAULT_HOST_SHARE = 0.5


def available_gib() -> Optional[float]:
    """MemAvailable of this machine in GiB (Linux), or None where /proc/meminfo does not say.

    QFORGE_HOST_AVAILABLE_GIB stands in for it where /proc/meminfo is the wrong figure (a container whose limit is
    below the host's memory) and in the tests, so that plans come out the same on machines with more or less RAM.
    """
    pinned = os.environ.get("QFORGE_HOST_AVAILABLE_GIB")
    if pinned:
        try:
            return float(pinned)
        except ValueError:
            return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


def host_target(cfg: Any) -> Tuple[Optional[float], str]:
    """The host memory of one node the pinned buffers are checked against, and where that figure comes from."""
    if cfg.train.host_mem_gib is not None:
        return float(cfg.train.host_mem_gib), "train.host_mem_gib"
    if cfg.launcher.name.value == "slurm":
        return None, "a Slurm node's memory is not this machine's; set train.host_mem_gib"
    found = available_gib()
    if found is None:
        return None, "this machine does not report its available memory; set train.host_mem_gib"
    return found, "available on this machine"


def ranks_per_node(cfg: Any) -> int:
    """Processes on one node (trainer.layout), 1 where launcher.nproc_per_node is a value its rule refuses."""
    from trainer.env import accelerators
    from trainer.layout import ranks_per_node as per_node

    try:
        return max(int(per_node(cfg, accelerators().gpus)), 1)
    except (TypeError, ValueError):
        return 1
