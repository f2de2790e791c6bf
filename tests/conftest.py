"""Shared test plumbing: an isolated model cache, offline hubs, the gpu marker, and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Nothing in the suite may reach a model hub or a wandb server.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Plans depend on the host's available memory (train.offload_activations=null, trainer/memory/host.py): every
    # machine's tests plan for the same 24 GiB, the CI machine's size, whatever this one has free.
    os.environ["QFORGE_HOST_AVAILABLE_GIB"] = "24"
    # One cache per test session: the tiny model is built once, by the suite itself.
    if "QFORGE_CACHE" not in os.environ:
        cache = Path(config.rootpath) / ".pytest_cache" / "qforge-models"
        os.environ["QFORGE_CACHE"] = str(cache)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; run on the GPU machine (tests/gpu/README.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- CPU instruction sets: the suite covers the machine's own kernels and the AVX2 ones ----
#
# torch, oneDNN, MKL and bitsandbytes choose CPU kernels by instruction set (bitsandbytes keys its AVX-512
# paths on torch's capability). Tests whose numbers could move with that choice run twice: once on this
# CPU's own path, once with every library capped at AVX2, so green on an AVX-512/AMX machine means green on
# an AVX2-only one and back. On a CPU whose own path already is AVX2 the second run would repeat the first.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def native_cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_paths() -> List[pytest.param]:
    above_avx2 = native_cpu_capability() not in ("AVX2", "DEFAULT", "NO AVX")
    return [pytest.param({}, id="cpu-native"),
            pytest.param(AVX2_ENV, id="cpu-avx2", marks=[] if above_avx2 else [pytest.mark.skip(
                reason=f"this CPU's own kernels are {native_cpu_capability()}: cpu-native already covers AVX2")])]


def run_cli(*overrides: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None,
            console_script: bool = False) -> subprocess.CompletedProcess:
    """Run `python train.py <overrides>` (or the `qforge` script) exactly as a user would."""
    if console_script:
        command = [str(Path(sys.executable).parent / "qforge"), *overrides]
    else:
        command = [sys.executable, str(REPO / "train.py"), *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def output_root(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    return root


def only_run_dir(output_root: Path) -> Path:
    """The single run dir a run created under output_root (<root>/<date>/<time-tag>)."""
    # Dot dirs are not runs: .data_cache holds the tokenized data runs under this root share.
    dirs = [p for p in output_root.glob("*/*") if p.is_dir() and not p.parent.name.startswith(".")]
    assert len(dirs) == 1, f"expected one run dir under {output_root}, found {dirs}"
    return dirs[0]
