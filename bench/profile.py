"""Where a qforge training step spends GPU time and what it keeps for backward.

    python -m bench.profile --item a [OVERRIDE ...]     # on the GPU machine (bash bench/device.sh-style env)

Runs qforge on a bench work item (same checkpoint and data as bench.run), profiles one step after
warm-up with torch.profiler (top kernels by CUDA time), and on another step records every tensor
autograd saves for backward (by shape and dtype, each storage counted once), which is what decides
how many layers fit without activation checkpointing.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any, Dict, List

from bench.run import ITEMS, item_data
from bench.side import qforge_overrides
from bench.workload import build_checkpoint


class StepProbe:
    """A Trainer callback: profile step `profile_at`, record saved tensors on step `saved_at`."""

    def __init__(self, profile_at: int, saved_at: int, rows: int, trace: str = "", kernels_at: int = -1) -> None:
        self.profile_at, self.saved_at, self.rows, self.trace = profile_at, saved_at, rows, trace
        # kernels_at: a step recorded with CUDA activity only, so that the CPU runs at its own pace (the op
        # recording of profile_at slows the CPU down and makes a step look more CPU-bound than it is)
        self.kernels_at = kernels_at
        self.profiler: Any = None
        self.hooks: Any = None
        self.saved: Dict[int, tuple] = {}

    def _pack(self, tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        self.saved.setdefault(storage.data_ptr(), (tuple(tensor.shape), str(tensor.dtype), storage.nbytes()))
        return tensor

    def callback(self) -> Any:
        from transformers import TrainerCallback

        probe = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                probe.begin(state.global_step)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                probe.end(state.global_step)

        return _Callback()

    def begin(self, step: int) -> None:
        import torch

        if step == self.profile_at:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        if step == self.kernels_at and torch.cuda.is_available():
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
        if step == self.saved_at:
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self.hooks.__enter__()

    def end(self, step: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.profiler is not None and step == self.profile_at + 1:
            self.profiler.__exit__(None, None, None)
            order = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            averages = self.profiler.key_averages()
            print(averages.table(sort_by=order, row_limit=self.rows), flush=True)
            # Python and launch cost: what the CPU spends outside the ops it calls.
            print(averages.table(sort_by="self_cpu_time_total", row_limit=self.rows), flush=True)
            print(gpu_busy(self.profiler.events()), flush=True)
            if self.trace:
                self.profiler.export_chrome_trace(self.trace)
                print(f"trace: {self.trace}", flush=True)
            self.profiler = None
        if self.profiler is not None and step == self.kernels_at + 1:
            self.profiler.__exit__(None, None, None)
            events = self.profiler.events()
            print(f"kernels-only step {self.kernels_at}: {gpu_busy(events)}", flush=True)
            print(timeline(events), flush=True)
            if self.trace:
                kernels_trace = self.trace.replace(".json", "") + "-kernels.json"
                self.profiler.export_chrome_trace(kernels_trace)
                print(f"trace: {kernels_trace}", flush=True)
            self.profiler = None
        if self.hooks is not None and step == self.saved_at + 1:
            self.hooks.__exit__(None, None, None)
            self.hooks = None
            self.report_saved()

    def report_saved(self) -> None:
        groups: Dict[tuple, List[int]] = collections.defaultdict(list)
        for shape, dtype, nbytes in self.saved.values():
            groups[(shape, dtype)].append(nbytes)
        total = sum(sum(v) for v in groups.values())
        print(f"saved for backward: {total / 2**30:.2f} GiB in {len(self.saved)} storages", flush=True)
        ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
        for (shape, dtype), sizes in ranked[: self.rows]:
            print(f"  {sum(sizes) / 2**30:7.3f} GiB  {len(sizes):4d} x {shape} {dtype}", flush=True)


def _is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def _spans(events: Any, copies: bool = False) -> List[tuple]:
    return sorted((e.time_range.start, e.time_range.end) for e in events
                  if getattr(e.device_type, "name", "") == "CUDA" and e.time_range.end > e.time_range.start
                  and _is_copy(e.name) == copies)


def _union(spans: List[tuple], lo: float, hi: float) -> float:
    busy, end = 0.0, lo
    for start, stop in spans:
        start, stop = max(start, end), min(stop, hi)
        if stop > start:
            busy, end = busy + stop - start, stop
    return busy


def timeline(events: Any, window_ms: float = 25.0) -> str:
    """Kernel-busy share of each window of the step, with the bytes-moving copies' share beside it: where in the
    step (forward, loss, backward) the GPU waits."""
    kernels, copies = _spans(events), _spans(events, copies=True)
    if not kernels:
        return "timeline: no kernels recorded"
    first, last = kernels[0][0], max(s[1] for s in kernels)
    width = window_ms * 1e3
    lines, lo = [f"timeline ({window_ms:.0f} ms windows: kernels busy %, copies busy %):"], first
    while lo < last:
        hi = min(lo + width, last)
        lines.append(f"  {(lo - first) / 1e3:7.1f} ms  kernels {100 * _union(kernels, lo, hi) / (hi - lo):3.0f}%  "
                     f"copies {100 * _union(copies, lo, hi) / (hi - lo):3.0f}%")
        lo = hi
    gaps, end = [], kernels[0][1]
    for start, stop in kernels[1:]:
        if start > end:
            gaps.append(start - end)
        end = max(end, stop)
    gaps.sort(reverse=True)
    lines.append(f"  idle gaps between kernels: {len(gaps)}, {sum(gaps) / 1e3:.1f} ms in all, the largest "
                 + ", ".join(f"{g / 1e3:.2f}" for g in gaps[:8]) + " ms")
    by_kind: Dict[str, float] = collections.defaultdict(float)
    for e in events:
        if getattr(e.device_type, "name", "") == "CUDA" and not _is_copy(e.name):
            by_kind[kernel_kind(e.name)] += e.time_range.end - e.time_range.start
    lines.append("  kernel time by kind: " + ", ".join(
        f"{kind} {t / 1e3:.1f} ms" for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, marks in (("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
                        ("attention", ("flash", "fmha", "cudnn", "attn", "sdpa")),
                        ("dequantize", ("dequant", "kdequantize")),
                        ("triton", ("triton",)),
                        ("copy/cast", ("copy", "cast", "convert")),
                        ("reduce", ("reduce",))):
        if any(m in lowered for m in marks):
            return kind
    return "elementwise/other"


def gpu_busy(events: Any) -> str:
    """How much of the profiled step the GPU ran kernels (the union of kernel intervals) and how many it ran.

    The rest is time the GPU waited: for the CPU to launch work, or for copies and synchronisations.
    """
    spans = _spans(events)
    if not spans:
        return "gpu busy: no kernels recorded"
    busy, (start, end) = 0.0, spans[0]
    first, last = spans[0][0], max(s[1] for s in spans)
    for lo, hi in spans[1:]:
        if lo > end:
            busy, start, end = busy + end - start, lo, hi
        else:
            end = max(end, hi)
    busy += end - start
    wall = last - first
    return (f"gpu busy: {busy / 1e3:.1f} ms of {wall / 1e3:.1f} ms from first to last kernel "
            f"({100 * busy / wall:.0f}%), {len(spans)} kernels")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--item", default="a", choices=sorted(ITEMS))
    parser.add_argument("--workdir", default="/dev/shm/qforge-bench")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--trace", default="", help="write the profiled step's chrome trace here")
    parser.add_argument("overrides", nargs="*", help="qforge overrides, e.g. train.checkpoint_layers=0")
    args = parser.parse_args(argv)
    from trainer import run as qforge_run
    from trainer.compose import compose
    from trainer.log import configure_logging
    from trainer.plan import build_plan

    configure_logging()
    spec = ITEMS[args.item]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(spec["shape"], workdir)
    data = item_data(args.item, spec, workdir)
    job = {"checkpoint": str(checkpoint), "warmup": 3, "steps": 4, "workdir": str(workdir)}
    item = {"data": str(data), "max_len": spec["max_len"], "batch": spec["batch"]}
    cfg = compose(qforge_overrides(job, item, list(args.overrides)))
    probe = StepProbe(profile_at=3, saved_at=6, rows=args.rows, trace=args.trace, kernels_at=5)
    qforge_run.train(build_plan(cfg), extra_callbacks=[probe.callback()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
