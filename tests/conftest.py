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
    dirs = [p for p in output_root.glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, f"expected one run dir under {output_root}, found {dirs}"
    return dirs[0]
