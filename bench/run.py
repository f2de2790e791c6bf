"""Side-by-side benchmark: plain HF Trainer + peft + bitsandbytes against qforge, in one invocation.

    python -m bench.run                     # GPU: items a, b, c with qforge's defaults
    python -m bench.run --items c,cv --ladder c   # each speed change on its own, on the 1B shape
    python -m bench.run --tiny              # CPU smoke test: tiny shape, seconds

Work items (seq 2048, batch 4, bnb4 nf4 + double quant, LoRA r=16 on all linear layers, gradient
checkpointing; random weights, built once per shape):
    a   Llama-3-8B shape, every example 2048 tokens
    b   Llama-3-8B shape, instruction-like lengths (lognormal, median 256, tail to 2048)
    c   Llama-3.2-1B shape, every example 2048 tokens
    cv  Llama-3.2-1B shape, instruction-like lengths
Tokens/s counts non-padding tokens only; warm-up steps are excluded and the median of the measured
steps is reported. Each side runs in its own process; the table is printed after every side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from bench.workload import build_checkpoint, write_data

ITEMS: Dict[str, Dict[str, Any]] = {
    "a": {"shape": "8b", "kind": "fixed", "max_len": 2048, "batch": 4},
    "b": {"shape": "8b", "kind": "variable", "max_len": 2048, "batch": 4},
    "c": {"shape": "1b", "kind": "fixed", "max_len": 2048, "batch": 4},
    "cv": {"shape": "1b", "kind": "variable", "max_len": 2048, "batch": 4},
    "ta": {"shape": "tiny", "kind": "fixed", "max_len": 128, "batch": 4},
    "tb": {"shape": "tiny", "kind": "variable", "max_len": 128, "batch": 4},
}
# Each speed change on its own, in order. Liger patches module-level functions, so within one qforge
# process every liger-off variant runs before the first liger-on one.
LADDER = [
    ("stock: padded, HF loss, fp32 norms", ["train.packing=false", "train.fused_ce=false", "model.liger=false",
                                            "model.upcast_layernorm=true"]),
    ("+ chunked CE", ["train.packing=false", "model.liger=false", "model.upcast_layernorm=true"]),
    ("+ bf16 norms", ["train.packing=false", "model.liger=false", "model.upcast_layernorm=false"]),
    ("+ liger kernels", ["train.packing=false", "model.upcast_layernorm=false"]),
    ("+ packing", ["model.upcast_layernorm=false"]),
]
LOSS_TOLERANCE = 0.02  # relative: bf16 has 8 bits of mantissa; fp32-upcast head vs bf16 head


def item_data(name: str, spec: Dict[str, Any], workdir: Path) -> Path:
    """The work item's JSONL: 64 full-length examples, or 2,000 instruction-like ones to pack."""
    count = 64 if spec["kind"] == "fixed" else 2000
    return write_data(workdir / f"data-{name}.jsonl", spec["kind"], count, spec["max_len"])


def parse_variant(spec: str) -> Dict[str, Any]:
    """ITEMS:NAME:OVERRIDES, e.g. `a:ckpt24:train.checkpoint_layers=24` (ITEMS may be `all`)."""
    items, name, overrides = (spec.split(":", 2) + ["", ""])[:3]
    return {"items": items.split(","), "name": name, "overrides": overrides.split()}


def variants_for(item: str, args: argparse.Namespace) -> List[Dict[str, Any]]:
    chosen: List[Dict[str, Any]] = []
    if item in args.ladder.split(",") or args.ladder == "all":
        chosen += [{"name": n, "overrides": o} for n, o in LADDER]
    chosen.append({"name": "qforge defaults", "overrides": []})
    for spec in map(parse_variant, args.variant):
        if item in spec["items"] or "all" in spec["items"]:
            chosen.append({"name": spec["name"], "overrides": spec["overrides"]})
    return chosen


def run_side(job: Dict[str, Any], logs: Path, deadline: float) -> List[Dict[str, Any]]:
    name = f"{job['side']}-{'-'.join(i['name'] for i in job['items'])}"
    job_file = Path(job["workdir"]) / f"{name}.json"
    job["out"] = str(Path(job["workdir"]) / f"{name}.result.json")
    job_file.write_text(json.dumps(job))
    log_path = logs / f"{name}.log"
    started = time.monotonic()
    print(f"bench: {name} ...", flush=True)
    with log_path.open("w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.side", str(job_file)], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=max(10.0, deadline - time.monotonic()),
                                  cwd=Path(__file__).resolve().parent.parent)
            failed = proc.returncode != 0 and f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed = "out of time"
    print(f"bench: {name} took {time.monotonic() - started:.0f}s", flush=True)
    if failed:
        tail = log_path.read_text().splitlines()[-25:]
        print(f"bench: {name} FAILED ({failed}); last lines of {log_path}:\n  " + "\n  ".join(tail), flush=True)
    return json.loads(Path(job["out"]).read_text()) if Path(job["out"]).exists() else []


def table(results: List[Dict[str, Any]], device: str) -> str:
    lines = [f"GPU: {device}", "",
             "| item | side | tokens/s | step s | tokens/step | peak GiB | x tokens/s | x peak mem | "
             "fixed-batch loss | loss vs base |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for item in dict.fromkeys(r["item"] for r in results):
        rows = [r for r in results if r["item"] == item]
        base = next((r for r in rows if r["side"] == "baseline"), None)
        for r in rows:
            ratio = mem = check = "-"
            if base is not None and r is not base:
                ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}"
                mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base["peak_gib"] else "-"
                rel = abs(r["probe_loss"] - base["probe_loss"]) / abs(base["probe_loss"])
                check = f"{'ok' if rel <= LOSS_TOLERANCE else 'DIFFERS'} ({rel:.1e})"
            label = "HF Trainer + peft (baseline)" if r["side"] == "baseline" else f"qforge: {r['variant']}"
            lines.append(f"| {item} | {label} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                         f"{r['tokens_per_step']:,.0f} | {r['peak_gib']:.2f} | {ratio} | {mem} | "
                         f"{r['probe_loss']:.4f} | {check} |")
    return "\n".join(lines)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU only (torch {torch.__version__})"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="a,b,c", help="comma list of work items (a, b, c, cv)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, items ta,tb, few steps")
    parser.add_argument("--ladder", default="", help="ITEMS (or all): also run each speed change on its own")
    parser.add_argument("--variant", action="append", default=[], help="ITEMS:NAME:OVERRIDES (repeatable)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="checkpoints and data (default: /dev/shm or /tmp)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="table, results and logs")
    parser.add_argument("--deadline", type=float, default=3600, help="seconds for the whole bench")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    if args.tiny:
        args.items = "ta,tb" if args.items == parser.get_default("items") else args.items
        args.warmup, args.steps = 1, 2
    names = args.items.split(",")
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        parser.error(f"unknown work item(s) {unknown}; choose from {sorted(ITEMS)}")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or _default_workdir(args.tiny))
    workdir.mkdir(parents=True, exist_ok=True)
    device = device_name()
    print(f"bench: {device}; workdir {workdir}; items {names}; {args.warmup} warm-up + {args.steps} measured steps",
          flush=True)

    results: List[Dict[str, Any]] = []
    for shape in dict.fromkeys(ITEMS[n]["shape"] for n in names):
        started = time.monotonic()
        checkpoint = build_checkpoint(shape, workdir)
        print(f"bench: checkpoint {shape} ready in {time.monotonic() - started:.0f}s", flush=True)
        items = []
        for name in (n for n in names if ITEMS[n]["shape"] == shape):
            spec = ITEMS[name]
            data = item_data(name, spec, workdir)
            items.append({"name": name, "data": str(data), "max_len": spec["max_len"], "batch": spec["batch"],
                          "variants": variants_for(name, args)})
        common = {"checkpoint": str(checkpoint), "items": items, "warmup": args.warmup, "steps": args.steps,
                  "workdir": str(workdir)}
        for side in ("baseline", "qforge"):
            results += run_side({**common, "side": side}, out / "logs", deadline)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            if results:
                print(table(results, device), flush=True)
    report = table(results, device) if results else "no results"
    (out / "table.md").write_text(report + "\n")
    if args.tiny or args.workdir is None and workdir.is_relative_to(tempfile.gettempdir()):
        shutil.rmtree(workdir / "runs", ignore_errors=True)
    ok = bool(results) and all(r["side"] == "baseline" or _loss_ok(r, results) for r in results)
    return 0 if ok else 1


def _loss_ok(row: Dict[str, Any], results: List[Dict[str, Any]]) -> bool:
    base = next((r for r in results if r["item"] == row["item"] and r["side"] == "baseline"), None)
    return base is not None and abs(row["probe_loss"] - base["probe_loss"]) <= LOSS_TOLERANCE * abs(base["probe_loss"])


def _default_workdir(tiny: bool) -> str:
    if tiny:
        return tempfile.mkdtemp(prefix="qforge-bench-")
    shm = Path("/dev/shm")
    # The 8B checkpoint is 16 GB: RAM-backed /dev/shm writes and reads it several times faster than disk.
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return str(shm / "qforge-bench")
    return os.path.join(tempfile.gettempdir(), "qforge-bench")


if __name__ == "__main__":
    sys.exit(main())
