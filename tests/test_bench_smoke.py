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


def test_fresh_adapter_restarts_every_item_from_the_same_adapter() -> None:
    """The baseline and unsloth sides train several items on one loaded model: bench.side.fresh_adapter must put
    every LoRA layer back to a seeded start (A drawn again, B zero) so each item's per-step losses start where
    qforge's fresh runs do."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.side import fresh_adapter

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 64, (2, 8))
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    assert fresh_adapter(model) == 14  # 7 linear layers x 2 decoder layers
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param))  # what training did to the previous item's adapter
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)
    fresh_adapter(model)
    again = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(start[n], again[n]) for n in start)
    assert all(not again[n].any() for n in again if "lora_B" in n)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base_logits)


@pytest.mark.slow
def test_trajectory_mode_logs_thirty_steps_per_side_and_holds_qforge_to_the_baseline(tmp_path: Path) -> None:
    """bench.run --trajectory: 30 logged steps per row, LoRA dropout 0 on both sides, and the table's step-by-step
    loss gap against the baseline (qforge must stay within 2% at every step for the exit code to be 0)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--items", "ta", "--trajectory",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    base, ours = (next(r for r in results if r["side"] == side) for side in ("baseline", "qforge"))
    assert len(base["losses"]) == len(ours["losses"]) == 30
    assert base["lora_dropout"] == ours["lora_dropout"] == 0.0
    # the same schedule (linear, no warm-up) and, the item being one example per row, the same batches: the first
    # training step sees the same tokens on both sides, so its loss agrees as closely as the fixed-batch probe's
    assert ours["lrs"] == pytest.approx(base["lrs"], rel=1e-6) and ours["lrs"][0] > ours["lrs"][-1] > 0
    assert ours["losses"][0] == pytest.approx(base["losses"][0], rel=2e-3)
    gaps = [abs(a - b) / b for a, b in zip(ours["losses"], base["losses"], strict=True)]
    assert max(gaps) <= 0.02
    assert base["losses"][-1] < base["losses"][0] and ours["losses"][-1] < ours["losses"][0]
    assert f"| 30 | {max(gaps):.2%} |" in (out / "table.md").read_text()


def test_liger_off_variants_run_before_liger_patches_leak_into_them() -> None:
    from bench.side import run_order

    def variants(*names: str) -> list[dict]:
        return [{"name": name, "overrides": overrides} for name, overrides in
                {"defaults": [], "compiled": ["train.compile=true"], "ckpt8": ["train.checkpoint_layers=8"],
                 "noliger": ["model.liger=false", "train.fused_ce=false"]}.items() if name in names]

    items = [{"name": "a", "variants": variants("defaults", "compiled", "ckpt8")},
             {"name": "L", "variants": variants("defaults", "noliger", "compiled")}]
    order = [(item["name"], variant["name"]) for item, variant in run_order(items)]
    # one process runs every item: the liger-off rows of all items first, then the rest, each in the order given
    assert order == [("a", "compiled"), ("L", "compiled"), ("L", "noliger"),
                     ("a", "defaults"), ("a", "ckpt8"), ("L", "defaults")]
