"""What the machine offers, probed without importing torch (so a login node answers quickly)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerators:
    gpus: int
    bf16: bool


@functools.lru_cache(maxsize=1)
def accelerators() -> Accelerators:
    """NVIDIA GPUs visible to this process, and whether all of them compute in bf16 (sm80+)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return Accelerators(0, False)
    if shutil.which("nvidia-smi") is None:
        return Accelerators(0, False)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return Accelerators(0, False)
    caps = [float(line) for line in out.split() if line.strip()]
    if visible:
        caps = caps[: len([d for d in visible.split(",") if d.strip()])]
    return Accelerators(len(caps), bool(caps) and min(caps) >= 8.0)
