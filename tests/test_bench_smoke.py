"""bench/ runs both sides (plain HF Trainer + peft, and qforge) and prints the table, on CPU with the tiny shape."""

from __future__ import annotations

import json
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
