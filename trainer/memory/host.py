"""Host memory for train.offload_activations: every process of a node keeps its pinned buffers in that node's RAM.

The memory model predicts the pinned bytes per GPU (Prediction.host_bytes); this module says what they are
checked against (train.host_mem_gib, or what this machine has available when the run trains here) and how many
processes share one node. Pinned memory cannot be swapped: a node that runs out of it kills processes rather
than slowing down, so a run that would not fit is refused before it starts.
"""

from __future__ import annotations

import os
from pathlib import Path
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


def available_gib(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The memory this process can still take, in GiB: MemAvailable of the machine (Linux), or less where the
    process's memory cgroup (a container's or a job's limit) leaves less; None where /proc/meminfo does not say.

    Pinned buffers count against a cgroup's limit like any other memory, and inside a container /proc/meminfo shows
    the whole host's, so without the cgroup a default could pin past the container's limit and be killed.
    QFORGE_HOST_AVAILABLE_GIB stands in for the whole figure where neither is right, and in the tests, so that plans
    come out the same on machines with more or less RAM.
    """
    pinned = os.environ.get("QFORGE_HOST_AVAILABLE_GIB")
    if pinned:
        try:
            return float(pinned)
        except ValueError:
            return None
    machine = _meminfo_available(Path(proc) / "meminfo")
    if machine is None:
        return None
    room = cgroup_room_bytes(Path(proc) / "self" / "cgroup", Path(cgroup_root))
    return machine if room is None else min(machine, room / GIB)


def _meminfo_available(path: Path) -> Optional[float]:
    try:
        with open(path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None
    return None


# A cgroup v1 "no limit" is the largest page-aligned int64; anything this large is no limit either.
_NO_LIMIT = 2**60


def cgroup_room_bytes(self_cgroup: Path, root: Path) -> Optional[int]:
    """Bytes left under the tightest memory limit of this process's cgroup and its ancestors (v2: memory.max less
    memory.current; v1: memory.limit_in_bytes less memory.usage_in_bytes), or None where none is set or readable."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # v2, unified
            rooms += _rooms(root, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            rooms += _rooms(root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes")
    return min(rooms) if rooms else None


def _rooms(mount: Path, path: str, limit_name: str, usage_name: str) -> list:
    """limit - usage at each level from the process's cgroup up to the mount (a container sees its own cgroup as the
    mount's root, so the path may not exist below it: then the mount's root is the process's cgroup)."""
    found = []
    here = mount / path.strip("/")
    levels = [here, *here.parents] if here.is_dir() else [mount]
    for level in levels:
        if level != mount and mount not in level.parents:
            break
        limit, usage = _read_int(level / limit_name), _read_int(level / usage_name)
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            found.append(max(limit - usage, 0))
    return found


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 says "max" for no limit


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
