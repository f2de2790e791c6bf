"""The memory check as a user meets it: dry runs refused with the peak and fixes, the plan's breakdown,
train.checkpoint_layers=auto end to end, python -m trainer.memory (table and --sweep PNG), and a Slurm sweep."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, only_run_dir, run_cli

SEVENTY = ["model=llama3_70b", "quant=bnb4", "train.max_seq_len=32768"]
EIGHT_GPUS = ["launcher=torchrun", "launcher.nproc_per_node=8", "strategy=fsdp"]


def memory_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: [memory.fits] "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def gib_after(text: str, marker: str) -> float:
    return float(re.search(re.escape(marker) + r" ([0-9.]+) GiB", text).group(1))


def test_70b_at_32k_on_a_24gib_gpu_is_refused_with_peak_and_fixes(output_root: Path) -> None:
    result = run_cli(*SEVENTY, "train.gpu_mem_gib=24", "dry_run=true", f"output_root={output_root}")
    assert result.returncode == 2
    line = memory_error(result.stderr)
    assert gib_after(line, "the predicted peak is") > 24 and "more than the 24 GiB GPU (train.gpu_mem_gib)" in line
    assert "largest terms:" in line and "base weights" in line
    fix = line.split(" Fix: ", 1)[1]
    # nothing fits 24 GiB: each rank builds the whole 4-bit 70B model while loading; the fix says what would
    assert "train.eval_batch_size=1" in fix and "train.batch_size=1" in fix and "use GPUs with at least" in fix
    assert "nothing was run" in result.stderr and not output_root.exists()


def test_70b_at_32k_tokens_per_gpu_does_not_fit_80gib_even_sharded_over_8(output_root: Path) -> None:
    """FSDP shards the weights, not the activations: 4 x 32k tokens keep 160 GiB of checkpointed layer inputs
    per GPU. The fix the rule names (one sequence per micro-batch, and per eval batch) is a run that fits."""
    result = run_cli(*SEVENTY, *EIGHT_GPUS, "train.gpu_mem_gib=80", "dry_run=true", f"output_root={output_root}")
    assert result.returncode == 2
    line = memory_error(result.stderr)
    largest = line.split("largest terms: ", 1)[1].split(". Fix:")[0]
    assert "base weights" not in largest and "checkpointed layer inputs" in largest  # weights sharded to an 8th
    fix = line.split(" Fix: ", 1)[1]
    assert fix.startswith("all of: ") and "train.batch_size=1 train.grad_accum=4" in fix
    assert "train.eval_batch_size=1" in fix
    assert not output_root.exists()
    fixed = run_cli(*SEVENTY, *EIGHT_GPUS, "train.gpu_mem_gib=80", "train.batch_size=1", "train.grad_accum=4",
                    "train.eval_batch_size=1", "dry_run=true", f"output_root={output_root}")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert yaml.safe_load(fixed.stdout)["memory"]["needed_per_gpu_gib"] < 80


def test_70b_sharded_over_8_gpus_of_80gib_fits_at_16k_tokens(output_root: Path) -> None:
    result = run_cli("model=llama3_70b", "quant=bnb4", "train.max_seq_len=16384", "train.batch_size=1",
                     "train.eval_batch_size=1", *EIGHT_GPUS, "train.gpu_mem_gib=80", "dry_run=true",
                     f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory." not in result.stderr
    plan = yaml.safe_load(result.stdout)["memory"]
    assert plan["per_gpu_of"] == 8 and plan["gpu_memory_gib"] == 80.0
    assert plan["verdict"].startswith("fits") and plan["needed_per_gpu_gib"] < 72
    assert plan["phases_gib"]["loading"] > 32  # every rank holds the whole 4-bit model while loading


def test_dry_run_plan_prints_the_breakdown_and_what_it_was_compared_with(output_root: Path) -> None:
    compared = yaml.safe_load(run_cli("train.gpu_mem_gib=24", "dry_run=true", f"output_root={output_root}").stdout)
    memory = compared["memory"]
    assert memory["gpu_memory_gib"] == 24.0 and memory["compared_with"] == "train.gpu_mem_gib"
    assert memory["verdict"].startswith("fits") and memory["device"] == "cuda"
    assert "base weights (bnb nf4 + double quant)" in memory["breakdown_gib"]
    # one CUDA process, a frozen untied table: it and lm_head (read by the chunked loss) are predicted in pinned
    # host memory (train.embeddings_on_host)
    assert not {"embeddings", "lm_head"} & set(memory["breakdown_gib"]) and "pinned_host_per_gpu_gib" in memory
    assert any("table in pinned host memory" in note for note in memory["assumptions"])
    assert memory["peak_allocated_gib"] <= memory["needed_per_gpu_gib"] < 24
    alone = yaml.safe_load(run_cli("dry_run=true", f"output_root={output_root}").stdout)["memory"]
    assert alone["gpu_memory_gib"] is None and alone["verdict"].startswith("not compared")
    assert "no GPU here" in alone["compared_with"]
    assert not output_root.exists()


def test_auto_is_decided_in_the_plan(output_root: Path) -> None:
    result = run_cli("model=llama3_8b", "train.max_seq_len=2048", "train.checkpoint_layers=auto",
                     "train.gpu_mem_gib=24", "model.liger=true", "do_eval=false", "dry_run=true",
                     f"output_root={output_root}")
    assert result.returncode == 0, result.stderr
    plan = yaml.safe_load(result.stdout)
    chosen = plan["speed"]["checkpoint_layers"]
    assert isinstance(chosen, int) and 0 < chosen < 32
    assert f"{chosen} of 32 layers checkpointed" in plan["memory"]["checkpoint_layers_auto"]
    assert plan["memory"]["checkpointed_layers"] == f"{chosen} of 32"
    roomy = yaml.safe_load(run_cli("model=llama3_8b", "train.max_seq_len=2048", "train.checkpoint_layers=auto",
                                   "train.gpu_mem_gib=141", "model.liger=true", "do_eval=false", "dry_run=true",
                                   f"output_root={output_root}").stdout)
    assert roomy["speed"]["checkpoint_layers"] == 0  # every layer keeps its activations on an H200


def test_auto_runs_with_the_planned_number(output_root: Path) -> None:
    result = run_cli("train.checkpoint_layers=auto", "train.gpu_mem_gib=0.75", "train.max_steps=2", "do_eval=false",
                     "data.eval_fraction=0", "train.save_steps=100", f"output_root={output_root}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(output_root)
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    chosen = plan["speed"]["checkpoint_layers"]
    assert isinstance(chosen, int) and chosen <= 4
    assert f"gradient checkpointing: {chosen} of 4 decoder layers" in (run_dir / "train.log").read_text()


def test_memory_cli_prints_the_table() -> None:
    result = subprocess.run([sys.executable, "-m", "trainer.memory", "model=llama3_8b", "train.gpu_mem_gib=80",
                             "train.max_seq_len=4096"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("base weights (bnb nf4 + double quant)", "LoRA r=16 parameters (fp32)", "-- at the peak:",
                     "+ CUDA context", "needed per GPU", "verdict: fits"):
        assert expected in out, expected
    refused = subprocess.run([sys.executable, "-m", "trainer.memory", *SEVENTY, "train.gpu_mem_gib=24"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "verdict: does NOT fit" in refused.stdout


def test_memory_cli_sweep_writes_a_table_and_a_png(tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    result = subprocess.run([sys.executable, "-m", "trainer.memory", "--sweep", "--png", str(png),
                             "model=llama3_8b", "train.gpu_mem_gib=24", "train.max_seq_len=1024,4096,16384",
                             "train.batch_size=1,4", "do_eval=false"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 6
    needed = {tuple(r.split(" | ")[:2]): float(r.split(" | ")[3]) for r in rows}
    assert needed[("| 16384", "4")] > needed[("| 16384", "1")] > needed[("| 1024", "1")]
    assert any(r.endswith("| NO |") for r in rows) and any(r.endswith("| yes |") for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_slurm_sweep_lists_cells_that_will_not_fit_and_submits_none_of_them(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "launcher=slurm", "launcher.slurm.gpu_mem_gib=24", "model=llama3_8b",
                     "train.max_seq_len=1024,65536", "dry_run=true", f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "validated 2 combination(s) before submitting anything: 1 legal, 1 illegal" in err
    assert re.search(r"#1 train.max_seq_len=65536: ILLEGAL, not submitted\n\s+error: \[memory\.fits\].*Fix:", err)
    assert "launcher.slurm.gpu_mem_gib" in err
    script = result.stdout
    assert "train.max_seq_len=1024" in script and "train.max_seq_len=65536" not in script
    assert "would submit 1 job(s)" in err
