"""GPU paths, run on the lent GPU machine (`bash tests/gpu/run_gpu_tests.sh`); skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import only_run_dir, run_cli

pytestmark = pytest.mark.gpu


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def test_default_qlora_run_on_gpu_uses_bf16_and_learns(output_root: Path) -> None:
    result = run_cli(f"output_root={output_root}", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    assert plan["device"] == "cuda" and plan["compute_dtype"] == "bfloat16"
    assert plan["quant"]["load_kwargs"]["bnb_4bit_quant_storage"] == "bfloat16"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["peak_memory_kind"] == "cuda_allocated" and metrics["peak_memory_bytes"] > 0
    assert metrics["eval_loss"] < 0.95 * metrics["eval_loss_before"], metrics


@pytest.mark.parametrize("overrides", [["quant=bnb8"], ["quant=hqq", "quant.bits=4"], ["quant=none", "peft=dora"]])
def test_backends_train_on_gpu(overrides: list[str], output_root: Path) -> None:
    result = run_cli(*overrides, "train.max_steps=10", f"output_root={output_root}",
                     env={"CUDA_VISIBLE_DEVICES": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run_dir(output_root) / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["eval_loss"] < metrics["eval_loss_before"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_two_gpu_strategies_with_nccl(strategy: str, output_root: Path) -> None:
    if gpu_count() < 2:
        pytest.skip("needs two GPUs")
    result = run_cli("launcher=torchrun", "launcher.nproc_per_node=2", f"strategy={strategy}", "quant=bnb4",
                     "train.max_steps=8", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    assert plan["strategy"]["dist_backend"] == "nccl" and plan["world_size"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 8
    assert (run_dir / "adapter" / "adapter_config.json").exists()
