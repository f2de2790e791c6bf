"""bench/ runs both sides (plain HF Trainer + peft, and qforge) and prints the table, on CPU with the tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_bench_prints_table_and_losses_agree(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--items", "tb", "--out", str(out),
                           "--workdir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| tb | HF Trainer + peft (baseline) |" in proc.stdout
    assert "| tb | qforge: qforge defaults |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    base, ours = (next(r for r in results if r["side"] == side) for side in ("baseline", "qforge"))
    # Same batch, same weights: packing + the chunked loss must give the padded HF loss (fp32 on CPU).
    assert abs(ours["probe_loss"] - base["probe_loss"]) < 1e-4
    # Variable lengths: packed rows carry more real tokens per step than padded batches of 4 examples.
    assert ours["tokens_per_step"] > base["tokens_per_step"]
    assert (out / "table.md").read_text().startswith("GPU: CPU only")


@pytest.mark.slow
def test_two_gpu_script_runs_its_pipeline_on_cpu(tmp_path: Path) -> None:
    """tests/gpu/two_gpus.py (issue 17's scaling table) end to end on gloo with the tiny shape: one process against
    two, and the fused LoRA branch against peft's forward under DDP, which with dropout 0 train the same."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "two_gpus.py"), "--smoke", "--out", str(out),
                           "--steps", "4", "--warmup", "1", "--only", "single-auto,ddp-peft,ddp-fused"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "QFORGE_BENCH_MODELS": str(tmp_path / "models")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads((out / "two_gpus.json").read_text())}
    assert set(rows) == {"single-auto", "ddp-peft", "ddp-fused"}
    assert all(r["steps"] == 4 and len(r["losses"]) == 4 and r["tokens_per_s_per_gpu"] > 0 for r in rows.values())
    assert rows["ddp-fused"]["fused_lora_plan"] == "on" and rows["ddp-peft"]["fused_lora_plan"] == "off"
    assert rows["ddp-fused"]["losses"] == pytest.approx(rows["ddp-peft"]["losses"], rel=1e-4)
    table = (out / "two_gpus.md").read_text()
    assert "| ddp-fused | 2 | on |" in table and "- ddp: " in table
