"""Data-path benchmark: tokenize + pack end to end, peak RSS, and the cached second start.

    python -m bench.data_bench                       # 1,000,000 records; the old loader on the first 100,000
    python -m bench.data_bench --records 20000 --old-records 20000    # a quick look

Records are Alpaca JSONL with bench item b's lengths (lognormal token counts, median 256, capped at 2048,
prompt 10-50% of each), written with the shipped tokenizer's word tokens. Measured, each in its own process:

- old: qforge's data loader before issue 13 (bench/baseline, verbatim) + its packing, on the first
  --old-records records (on the full file its Python lists would need ~20 GB here; it scales linearly);
- new, same file: trainer.data (datasets JSON->Arrow, template rendering, tokenizing, packing, cache write)
  on exactly the records the old loader read, then on the full --records file;
- cached: a second start on the full file: find the cache, memory-map it, the first packed batch.

Peak RSS is the largest resident set of the measured process tree (the process and its tokenizer workers,
sampled every 0.1 s), and separately the largest single process (ru_maxrss). Memory-mapped pages count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

MAX_LEN = 2048


def write_records(path: Path, count: int, seed: int = 0) -> Path:
    """Bench item b's length mix (bench.workload.write_data), vectorised so a million records take a minute."""
    import numpy as np
    from transformers import AutoTokenizer

    from bench.workload import _word_ids
    from trainer.tiny import TOKENIZER_DIR

    if path.is_file() and path.with_suffix(".done").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    words = np.array([tokenizer.decode([i]) for i in _word_ids(tokenizer)], dtype=object)
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(MAX_LEN / 8), 1.0, size=count), 16, MAX_LEN).astype(np.int64)
    prompts = np.maximum(4, (lengths * rng.uniform(0.1, 0.5, size=count)).astype(np.int64))
    with path.open("w") as out:
        for length, prompt in zip(lengths.tolist(), prompts.tolist()):
            picks = words[rng.integers(0, len(words), size=length)]
            out.write(json.dumps({"instruction": "".join(picks[:prompt]), "input": "",
                                  "output": "".join(picks[prompt:])}) + "\n")
    path.with_suffix(".done").write_text(str(count))
    return path


def head(source: Path, target: Path, count: int) -> Path:
    if not target.is_file():
        with source.open() as f, target.open("w") as out:
            for _, line in zip(range(count), f):
                out.write(line)
    return target


def overrides(data: Path, cache: Path) -> List[str]:
    return ["data=alpaca", f"data.path={data}", f"train.max_seq_len={MAX_LEN}", "do_eval=false",
            "data.eval_fraction=0", f"data.cache_dir={cache}"]


def phase(name: str, data: Path, cache: Path) -> Dict[str, Any]:
    """One measured phase, in this (child) process."""
    from transformers import AutoTokenizer

    from trainer.compose import compose
    from trainer.tiny import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = compose(overrides(data, cache))
    started = time.monotonic()
    if name == "old":
        from bench.baseline.data_before import load_examples
        from bench.baseline.packing_before import PackedDataset

        train, _ = load_examples(cfg, tokenizer)
        rows = PackedDataset(train, MAX_LEN, seed=0)
        result = {"examples": len(train), "rows": len(rows), "tokens": sum(len(e.input_ids) for e in train)}
    else:
        from trainer.data.prepare import training_data
        from trainer.data.spec import data_spec

        train, _, collator = training_data(data_spec(cfg), tokenizer)
        first_batch = collator([train[i] for i in range(4)])
        prepared = train.prepared
        result = {"examples": len(prepared.train_index), "rows": len(train), "tokens": int(prepared.lengths.sum()),
                  "tokenized_here": prepared.built_here, "num_proc": prepared.meta["num_proc"],
                  "first_batch_shape": list(first_batch["input_ids"].shape)}
    result["seconds"] = time.monotonic() - started
    result["max_rss_self_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["max_rss_workers_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return result


def measure(name: str, data: Path, cache: Path) -> Dict[str, Any]:
    """Run a phase in a child process; sample the RSS of its whole process tree meanwhile."""
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bench.data_bench", "--phase", name, "--data", str(data),
                             "--cache", str(cache)], stdout=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"})
    peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({"phase": name, "data": str(data), "peak_tree_rss_gib": peak / 2**30,
                   "process_wall_seconds": time.monotonic() - started})
    print(json.dumps(result), flush=True)
    return result


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--old-records", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/qforge-data-bench")
    parser.add_argument("--phase", choices=["old", "new", "cached"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.data), Path(args.cache))))
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    full = write_records(work / f"records-{args.records}.jsonl", args.records)
    print(f"data: {full} ({full.stat().st_size / 2**30:.2f} GiB) in {time.monotonic() - began:.0f} s", flush=True)
    part = head(full, work / f"records-{args.records}-head-{args.old_records}.jsonl", args.old_records)
    import shutil

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    results = [measure("old", part, cache), measure("new", part, cache), measure("new", full, cache),
               measure("cached", full, cache)]
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_average_after": os.getloadavg(), "results": results}
    (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    old, new_part, new_full, cached = results
    print(f"old loader, {old['examples']:,} records: {old['seconds']:.1f} s, "
          f"peak RSS {old['peak_tree_rss_gib']:.2f} GiB")
    print(f"new, same {new_part['examples']:,} records: {new_part['seconds']:.1f} s "
          f"({old['seconds'] / new_part['seconds']:.2f}x faster), peak RSS {new_part['peak_tree_rss_gib']:.2f} GiB")
    print(f"new, {new_full['examples']:,} records: {new_full['seconds']:.1f} s, peak RSS "
          f"{new_full['peak_tree_rss_gib']:.2f} GiB; old extrapolated: "
          f"{old['seconds'] * new_full['examples'] / old['examples']:.0f} s")
    print(f"cached start: {cached['seconds']:.2f} s in-process, {cached['process_wall_seconds']:.1f} s with "
          f"interpreter and imports, peak RSS {cached['peak_tree_rss_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
