"""Side-by-side benchmark: plain HF Trainer + peft + bitsandbytes against qforge, in one invocation.

    python -m bench.run                     # GPU: items a, b, c with qforge's defaults
    python -m bench.run --items c,cv --ladder c   # each speed change on its own, on the 1B shape
    python -m bench.run --tiny              # CPU smoke test: tiny shape, seconds
    python -m bench.run --items a,b,L --sides unsloth,qforge,baseline   # GPU: unsloth as a third side

Sides: `baseline` (HF Trainer + peft, as the transformers/peft QLoRA docs show), `qforge`, and `unsloth`
(bench/unsloth_side.py; GPU only, its wheels carried in .whl-unsloth and put on its process's path alone).

Work items (seq 2048, batch 4, bnb4 nf4 + double quant, LoRA r=16 on all linear layers, gradient
checkpointing; random weights, built once per shape):
    a   Llama-3-8B shape, every example 2048 tokens
    b   Llama-3-8B shape, instruction-like lengths (lognormal, median 256, tail to 2048)
    c   Llama-3.2-1B shape, every example 2048 tokens
    cv  Llama-3.2-1B shape, instruction-like lengths
    L   Llama-3-8B shape, one 16384-token example per step
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
    "L": {"shape": "8b", "kind": "fixed", "max_len": 16384, "batch": 1},
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
TRAJECTORY_STEPS = 30  # --trajectory: logged steps per row (3 of them warm-up for the timing)


def trajectory_deviation(row: Dict[str, Any], base: Dict[str, Any]) -> float | None:
    """The largest relative gap between a row's training loss and the baseline's at the same step."""
    pairs = list(zip(row.get("losses", []), base.get("losses", []), strict=False))
    if not pairs:
        return None
    return max(abs(ours - theirs) / abs(theirs) for ours, theirs in pairs)


def same_schedule(row: Dict[str, Any], base: Dict[str, Any]) -> bool:
    """Whether both rows logged the same learning rate at every step (a per-step loss gap means nothing else)."""
    ours, theirs = row.get("lrs", []), base.get("lrs", [])
    return len(ours) == len(theirs) and all(abs(a - b) <= 1e-6 * abs(b) + 1e-12 for a, b in zip(ours, theirs))


def item_data(name: str, spec: Dict[str, Any], workdir: Path) -> Path:
    """The work item's JSONL: 64 full-length examples of 2048 tokens (as many tokens in fewer, longer ones), or
    2,000 instruction-like ones to pack."""
    count = max(16, 64 * 2048 // spec["max_len"]) if spec["kind"] == "fixed" else 2000
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


SIDES = ("baseline", "qforge", "unsloth")


def _label(row: Dict[str, Any]) -> str:
    """A table row's side: the baseline by name, qforge by variant, unsloth by its version (its variant)."""
    if row["side"] == "baseline":
        return "HF Trainer + peft (baseline)"
    return f"qforge: {row['variant']}" if row["side"] == "qforge" else row["variant"]


def side_env(side: str) -> Dict[str, str]:
    """The unsloth side alone gets its packages (QFORGE_BENCH_UNSLOTH_SITE, set by bench/device.sh) on its path."""
    env = dict(os.environ)
    site = env.get("QFORGE_BENCH_UNSLOTH_SITE")
    if side == "unsloth":
        env.update(UNSLOTH_DISABLE_STATISTICS="1", HF_HUB_OFFLINE="1",
                   UNSLOTH_COMPILE_LOCATION=str(Path(env.get("TMPDIR", tempfile.gettempdir())) / "unsloth-cache"))
        if site:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    return env


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
                                  cwd=Path(__file__).resolve().parent.parent, env=side_env(job["side"]))
            failed = proc.returncode != 0 and f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed = "out of time"
    print(f"bench: {name} took {time.monotonic() - started:.0f}s", flush=True)
    if failed:
        tail = log_path.read_text().splitlines()[-25:]
        print(f"bench: {name} FAILED ({failed}); last lines of {log_path}:\n  " + "\n  ".join(tail), flush=True)
    return json.loads(Path(job["out"]).read_text()) if Path(job["out"]).exists() else []


def _ratio(row: Dict[str, Any], ref: Dict[str, Any] | None, key: str) -> str:
    if ref is None or row is ref or not ref[key]:
        return "-"
    return f"{row[key] / ref[key]:.2f}"


def table(results: List[Dict[str, Any]], device: str) -> str:
    """Every row against the item's baseline and (where the side ran) unsloth: tokens/s and peak memory ratios."""
    lines = [f"GPU: {device}", "",
             "| item | side | tokens/s | step s | tokens/step | peak GiB | x tokens/s | x peak mem | "
             "x unsloth tokens/s | x unsloth peak | fixed-batch loss | loss vs base | steps | max step loss gap |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for item in dict.fromkeys(r["item"] for r in results):
        rows = [r for r in results if r["item"] == item]
        base = next((r for r in rows if r["side"] == "baseline"), None)
        fast = next((r for r in rows if r["side"] == "unsloth"), None)
        for r in rows:
            check = gap = "-"
            if base is not None and r is not base:
                rel = abs(r["probe_loss"] - base["probe_loss"]) / abs(base["probe_loss"])
                check = f"{'ok' if rel <= LOSS_TOLERANCE else 'DIFFERS'} ({rel:.1e})"
                deviation = trajectory_deviation(r, base)
                gap = "-" if deviation is None else f"{deviation:.2%}"
                if deviation is not None and r.get("lrs") and not same_schedule(r, base):
                    gap += " (learning rates differ)"
            lines.append(f"| {item} | {_label(r)} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | "
                         f"{r['tokens_per_step']:,.0f} | {_peak(r)} | {_ratio(r, base, 'tokens_per_s')} | "
                         f"{_ratio(r, base, 'peak_gib')} | {_ratio(r, fast, 'tokens_per_s')} | "
                         f"{_ratio(r, fast, 'peak_gib')} | {r['probe_loss']:.4f} | {check} | "
                         f"{len(r.get('losses', []))} | {gap} |")
    settings = {r["variant"]: r["settings"] for r in results if r.get("settings")}
    for variant, spec in settings.items():
        lines += ["", f"{variant}: " + "; ".join(f"{k}: {v}" for k, v in spec.items())]
    return "\n".join(lines)


def _peak(row: Dict[str, Any]) -> str:
    """Measured peak, and qforge's own prediction for it (trainer/memory) where the row has one."""
    predicted = row.get("predicted_gib")
    return f"{row['peak_gib']:.2f}" + (f" (predicted {predicted:.2f})" if predicted else "")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU only (torch {torch.__version__})"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="a,b,c", help="comma list of work items (a, b, c, cv, L)")
    parser.add_argument("--sides", default="baseline,qforge",
                        help="comma list of sides, run in this order: baseline, qforge, unsloth (GPU only)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, items ta,tb, few steps")
    parser.add_argument("--ladder", default="", help="ITEMS (or all): also run each speed change on its own")
    parser.add_argument("--variant", action="append", default=[], help="ITEMS:NAME:OVERRIDES (repeatable)")
    parser.add_argument("--trajectory", action="store_true",
                        help=f"{TRAJECTORY_STEPS} steps per row with LoRA dropout 0 on every side; qforge's training "
                             f"loss must stay within {LOSS_TOLERANCE * 100:g}%% of the baseline's at every step")
    parser.add_argument("--dropout", type=float, default=None,
                        help="LoRA dropout of the baseline and qforge sides (default 0.05; --trajectory: 0)")
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
    if args.trajectory:
        args.steps = TRAJECTORY_STEPS - args.warmup
    dropout = args.dropout if args.dropout is not None else (0.0 if args.trajectory else None)
    names = args.items.split(",")
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        parser.error(f"unknown work item(s) {unknown}; choose from {sorted(ITEMS)}")
    sides = args.sides.split(",")
    if not sides or any(side not in SIDES for side in sides):
        parser.error(f"--sides {args.sides!r}: choose a comma list from {', '.join(SIDES)}")
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
            items.append({"name": name, "kind": spec["kind"], "data": str(data), "max_len": spec["max_len"],
                          "batch": spec["batch"],
                          "variants": variants_for(name, args)})
        common = {"checkpoint": str(checkpoint), "items": items, "warmup": args.warmup, "steps": args.steps,
                  "workdir": str(workdir), **({"dropout": dropout} if dropout is not None else {})}
        for side in sides:
            results += run_side({**common, "side": side}, out / "logs", deadline)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            if results:
                print(table(results, device), flush=True)
    report = table(results, device) if results else "no results"
    (out / "table.md").write_text(report + "\n")
    if args.tiny or args.workdir is None and workdir.is_relative_to(tempfile.gettempdir()):
        shutil.rmtree(workdir / "runs", ignore_errors=True)
    # Only qforge's rows are held to the baseline's fixed-batch loss; unsloth's is reported, not ours to fix.
    ok = bool(results) and all(r["side"] != "qforge" or _loss_ok(r, results, args.trajectory) for r in results)
    return 0 if ok else 1


def _loss_ok(row: Dict[str, Any], results: List[Dict[str, Any]], trajectory: bool = False) -> bool:
    base = next((r for r in results if r["item"] == row["item"] and r["side"] == "baseline"), None)
    if base is None or abs(row["probe_loss"] - base["probe_loss"]) > LOSS_TOLERANCE * abs(base["probe_loss"]):
        return False
    if not trajectory:
        return True
    deviation = trajectory_deviation(row, base)
    steps = min(len(row.get("losses", [])), len(base.get("losses", [])))
    return deviation is not None and steps == TRAJECTORY_STEPS and deviation <= LOSS_TOLERANCE \
        and same_schedule(row, base)


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
