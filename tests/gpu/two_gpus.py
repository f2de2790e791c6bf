"""Scaling on two GPUs (issue 17, items 2-4): one GPU against ddp / fsdp / zero3 on two, and the fused LoRA branch
against peft's forward under DDP and FSDP2, every measured peak beside the memory model's prediction.

On the two-GPU machine (nvidia-h200-x2), in one call (carry [".whl"]):
    source tests/gpu/install_on_device.sh && python3 tests/gpu/two_gpus.py --out $OUT
Here, on CPU (gloo, the tiny shape, a few steps), the same pipeline end to end:
    python tests/gpu/two_gpus.py --smoke --out /tmp/two-gpus

Every run is `python train.py` as a user types it: the bench's random-weight Llama checkpoint (8B shape by
default, built once), fixed-length rows (batch x seq tokens every step), bnb4 NF4 + LoRA r16 on all linear
layers, dropout 0 (so the fused branch and peft's forward train the same function), constant schedule.
tokens/s per GPU is batch x seq over the median step time of the steps after --warmup (each rank's steps timed
with the GPU synchronised, tests/probes.py:step_times; rank 0's reported). The peak is rank 0's
torch.cuda.max_memory_allocated over training (metrics.json), the prediction trainer.memory.predict of the same
overrides. Writes two_gpus.json and two_gpus.md into --out.

Not covered here: the 70B shape in 24 GiB (item 1), which needs loading that never holds the whole 4-bit model on
one GPU (docs/memory.md, "loading").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
GIB = 2**30

# (strategy, fused LoRA branch): one GPU, then each strategy on two; the fused branch against peft's forward
# under DDP and FSDP2 (ZeRO-3 refuses the fused branch).
CASES = [("single", None), ("ddp", None), ("fsdp", None), ("zero3", None), ("ddp", False), ("fsdp", False),
         ("ddp", True), ("fsdp", True)]


def overrides(model_dir: Path, data: Path, run_dir: Path, strategy: str, fused: Optional[bool], steps: int,
              seq: int, batch: int, smoke: bool) -> List[str]:
    args = ["model=local", f"model.name_or_path={model_dir}", "quant=bnb4", "peft=lora", "peft.r=16",
            "peft.alpha=32", "peft.dropout=0", "data=alpaca", f"data.path={data}", "data.eval_fraction=0",
            "do_eval=false", f"train.max_seq_len={seq}", f"train.batch_size={batch}", f"train.max_steps={steps}",
            "train.logging_steps=1", "train.save_steps=100000", "train.warmup_ratio=0", "train.scheduler=constant",
            "logger=none", f"strategy={strategy}", f"run_dir={run_dir}",
            "train.callbacks=[tests.probes:step_times]"]
    if fused is not None:
        args.append(f"train.fused_lora={'true' if fused else 'false'}")
    if strategy != "single":
        args += ["launcher=torchrun", "launcher.nproc_per_node=2"]
    return args


def predicted_gib(args: List[str], smoke: bool) -> Optional[float]:
    from trainer import memory
    from trainer.compose import compose

    if smoke:
        return None  # a CPU run has no GPU peak to compare with
    p = memory.predict(compose([a for a in args if not a.startswith("train.callbacks")]), device="cuda")
    return round(p.needed_bytes / GIB, 2) if p.known else None


def run_case(strategy: str, fused: Optional[bool], model_dir: Path, data: Path, out: Path, args: Any) -> Dict:
    name = f"{strategy}-{'auto' if fused is None else ('fused' if fused else 'peft')}"
    run_dir = out / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = overrides(model_dir, data, run_dir, strategy, fused, args.steps, args.seq, args.batch, args.smoke)
    env = dict(os.environ)
    if strategy == "single" and not args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *cmd], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=args.timeout)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    row: Dict[str, Any] = {"case": name, "strategy": strategy, "fused_lora": fused, "rc": proc.returncode,
                           "gpus": 1 if strategy == "single" else 2, "wall_s": round(time.monotonic() - started, 1),
                           "predicted_needed_gib": predicted_gib(cmd, args.smoke)}
    if proc.returncode != 0 or not (run_dir / "metrics.json").exists():
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        print(json.dumps(row), flush=True)
        return row
    m = json.loads((run_dir / "metrics.json").read_text())
    seconds = json.loads((run_dir / "step_times-0.json").read_text())["seconds"][args.warmup:]
    step = statistics.median(seconds)
    plan = json.loads((run_dir / ".hydra" / "plan.json").read_text())
    row.update({"steps": m["steps"], "losses": [e["loss"] for e in m["log_history"] if "loss" in e],
                "median_step_s": round(step, 4), "tokens_per_s_per_gpu": round(args.batch * args.seq / step, 1),
                "peak_gib": round(m["peak_memory_bytes"] / GIB, 2), "peak_kind": m.get("peak_memory_kind"),
                "fused_lora_plan": plan["speed"]["fused_lora"]})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


def table(rows: List[Dict], header: str) -> str:
    single = next((r for r in rows if r["strategy"] == "single" and r["rc"] == 0), None)
    lines = [header, "", "| case | GPUs | LoRA forward | tokens/s per GPU | x single | peak GiB/GPU | predicted GiB "
             "| final loss |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['case']} | {r['gpus']} | - | failed (rc {r['rc']}) | | | | |")
            continue
        ratio = f"{r['tokens_per_s_per_gpu'] / single['tokens_per_s_per_gpu']:.2f}" if single else ""
        lines.append(f"| {r['case']} | {r['gpus']} | {r['fused_lora_plan']} | {r['tokens_per_s_per_gpu']} | {ratio} "
                     f"| {r['peak_gib']} | {r['predicted_needed_gib'] if r['predicted_needed_gib'] else '-'} "
                     f"| {r['losses'][-1]:.4f} |")
    lines += ["", "Fused LoRA branch against peft's forward (dropout 0), largest relative loss difference over "
              "the steps:", ""]
    for strategy in ("ddp", "fsdp"):
        pair = {r["fused_lora"]: r for r in rows if r["strategy"] == strategy and r["rc"] == 0
                and r["fused_lora"] is not None}
        if True in pair and False in pair:
            diff = max(abs(a - b) / abs(b) for a, b in zip(pair[True]["losses"], pair[False]["losses"]))
            lines.append(f"- {strategy}: {diff:.2e} over {len(pair[True]['losses'])} steps")
        else:
            lines.append(f"- {strategy}: not measured (a run failed)")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/qforge-two-gpus"))
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny shape: the pipeline only")
    parser.add_argument("--shape", default=None, help="a bench.workload shape (8b by default, tiny with --smoke)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--only", default="", help="comma-separated case names, e.g. single-auto,ddp-auto")
    args = parser.parse_args()
    args.shape = args.shape or ("tiny" if args.smoke else "8b")
    args.steps = args.steps or (6 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
    args.seq = args.seq or (128 if args.smoke else 2048)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from bench.workload import build_checkpoint, write_data

    model_dir = build_checkpoint(args.shape, Path(os.environ.get("QFORGE_BENCH_MODELS", "/tmp/qforge-bench-models")))
    data = write_data(out / "data.jsonl", "fixed", max(64, args.batch * 2 * args.steps), args.seq)
    import torch

    where = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
             else "CPU (gloo), smoke")
    wanted = set(filter(None, args.only.split(",")))
    rows = [run_case(s, f, model_dir, data, out, args) for s, f in CASES
            if not wanted or f"{s}-{'auto' if f is None else ('fused' if f else 'peft')}" in wanted]
    header = (f"{args.shape} shape (bench/workload.py, random weights), bnb4 LoRA r16 dropout 0, seq {args.seq}, "
              f"batch {args.batch} per GPU, {args.steps} steps ({args.warmup} warm-up steps not timed); {where}.")
    text = table(rows, header)
    (out / "two_gpus.md").write_text(text)
    (out / "two_gpus.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
