"""What the machine offers, probed without importing torch (so a login node answers quickly)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Accelerators:
    gpus: int
    bf16: bool
    # Each visible GPU's total memory in GiB (nvidia-smi's memory.total), for the memory rule.
    memory_gib: Tuple[float, ...] = ()


@functools.lru_cache(maxsize=1)
def accelerators() -> Accelerators:
    """NVIDIA GPUs visible to this process, whether all of them compute in bf16 (sm80+), and their memory."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return Accelerators(0, False)
    if shutil.which("nvidia-smi") is None:
        return Accelerators(0, False)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return Accelerators(0, False)
    caps, memory = [], []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            caps.append(float(fields[0]))
            memory.append(float(fields[1]) / 1024 if len(fields) > 1 else 0.0)  # MiB
        except ValueError:
            continue
    if visible:
        # CUDA_VISIBLE_DEVICES holds indices or UUIDs; nvidia-smi lists every GPU, so keep as many as are visible.
        count = len([d for d in visible.split(",") if d.strip()])
        caps, memory = caps[:count], memory[:count]
    return Accelerators(len(caps), bool(caps) and min(caps) >= 8.0, tuple(m for m in memory if m > 0))
