"""The memory model against the GPU: torch.cuda.max_memory_allocated over real training steps vs trainer.memory.

    bash bench/memory_device.sh                          # on the GPU machine (carry [".whl"]): every cell
    python -m bench.memory_bench --out results.json      # the same, given an environment with the wheels
    python -m bench.memory_bench --report results.json [--write docs/memory.md]   # the table, here
    python -m bench.memory_bench --smoke --out smoke.json                         # CPU: tiny shape, seconds

Each cell is one composition: a shape (Llama-3-8B's or Llama-3.2-1B's, random weights built once as
bench/workload.py does), a backend (bnb4, bnb8, hqq 4-bit, none), a sequence length and batch, how many layers
are checkpointed (all, the first 8, none) and the LoRA path (the fused branch or peft's forward), on data with
one example per row (or packed instruction-like lengths, for the packed-mask cells). A group of cells that
share shape and backend loads its base model once, through qforge's own loader (trainer.model.load_model,
prepare_for_training, speed.apply: liger and the chunked loss); each cell then attaches a fresh adapter
(trainer.adapters.attach, speed.apply_to_adapter), trains a few steps with the HF Trainer and the plan's own
TrainingArguments and callbacks (partial checkpointing), exactly as trainer/run.py does, and unloads the
adapter again. Peak statistics are reset when training begins (after loading, as run.py does), so a cell's
peak covers its training steps: its forward, backward and optimizer steps with AdamW's state in place.

The prediction for each cell is trainer.memory.predict(cfg) of the same composed config, told whether rows
hold one example each. Results are written as they come (JSON list, one entry per cell) to --out, so a
deadline or a crash keeps what was measured; --report renders the markdown table of docs/memory.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from bench.side import free_memory

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
QUANT = {
    "bnb4": ["quant=bnb4"],
    "bnb8": ["quant=bnb8"],
    "hqq4": ["quant=hqq", "quant.bits=4", "quant.group_size=64"],
    "none": ["quant=none"],
}


@dataclass(frozen=True)
class Cell:
    shape: str  # a key of bench.workload.SHAPES
    quant: str  # a key of QUANT
    seq: int
    batch: int
    ckpt: Optional[int]  # None: every layer checkpointed; N: the first N
    fused: bool  # the fused LoRA branch (train.fused_lora=true) or peft's forward (false)
    data: str = "fixed"  # "fixed": one example of exactly seq tokens per row; "packed": short examples packed

    @property
    def name(self) -> str:
        ckpt = "all" if self.ckpt is None else str(self.ckpt)
        return (f"{self.shape}-{self.quant}-s{self.seq}-b{self.batch}-ckpt{ckpt}-{'fused' if self.fused else 'peft'}"
                + ("-packed" if self.data == "packed" else ""))

    @property
    def group(self) -> str:
        return f"{self.shape}-{self.quant}"

    def overrides(self, checkpoint: str, data: str, workdir: str, steps: int) -> List[str]:
        return ["model=local", f"model.name_or_path={checkpoint}", *QUANT[self.quant], "peft=lora", "peft.r=16",
                "peft.alpha=32", "peft.dropout=0.05", "data=alpaca", f"data.path={data}", "data.eval_fraction=0",
                "do_eval=false", f"train.max_seq_len={self.seq}", f"train.batch_size={self.batch}",
                f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=100000",
                "train.warmup_ratio=0", f"train.checkpoint_layers={'null' if self.ckpt is None else self.ckpt}",
                f"train.fused_lora={'true' if self.fused else 'false'}", "logger=none",
                f"output_root={workdir}/runs"]


def grid() -> List[Cell]:
    """The GPU grid: 30 single-GPU cells covering the issue's axes, most-used paths first."""
    c = Cell
    return [
        # Llama-3-8B shape, bnb4: the product path, every axis
        c("8b", "bnb4", 2048, 4, None, True), c("8b", "bnb4", 2048, 4, 8, True), c("8b", "bnb4", 2048, 4, 0, True),
        c("8b", "bnb4", 2048, 4, None, False), c("8b", "bnb4", 2048, 4, 8, False), c("8b", "bnb4", 2048, 1, 0, False),
        c("8b", "bnb4", 8192, 1, None, True), c("8b", "bnb4", 8192, 1, 8, True), c("8b", "bnb4", 8192, 4, None, True),
        c("8b", "bnb4", 16384, 1, None, True), c("8b", "bnb4", 16384, 1, 8, True),
        c("8b", "bnb4", 16384, 4, None, True), c("8b", "bnb4", 2048, 4, None, True, "packed"),
        # Llama-3.2-1B shape, each backend
        c("1b", "bnb4", 2048, 4, None, True), c("1b", "bnb4", 2048, 4, 0, True), c("1b", "bnb4", 8192, 4, 8, False),
        c("1b", "bnb4", 16384, 4, None, True), c("1b", "bnb4", 16384, 1, 0, False),
        c("1b", "bnb4", 8192, 1, 8, True, "packed"),
        c("1b", "none", 2048, 4, None, True), c("1b", "none", 16384, 1, 8, False),
        c("1b", "hqq4", 2048, 4, None, True), c("1b", "hqq4", 2048, 4, 0, False), c("1b", "hqq4", 8192, 1, 8, True),
        c("1b", "bnb8", 2048, 4, None, False), c("1b", "bnb8", 8192, 1, 0, True),
        # Llama-3-8B shape, 16-bit and int8 weights
        c("8b", "none", 2048, 4, None, True), c("8b", "none", 8192, 1, 0, True),
        c("8b", "bnb8", 2048, 4, None, True), c("8b", "bnb8", 2048, 1, 8, False),
    ]


def smoke_grid() -> List[Cell]:
    c = Cell
    return [c("tiny", "bnb4", 128, 2, None, True), c("tiny", "bnb4", 128, 2, 0, False),
            c("tiny", "hqq4", 64, 1, 1, True), c("tiny", "none", 128, 2, None, False, "packed"),
            c("tiny", "bnb8", 128, 2, None, False)]


# ---- the parent: checkpoints, data, one worker process, results --------------------------------------------

def data_for(cell: Cell, steps: int, workdir: Path) -> Path:
    """Enough rows for the steps: exactly-seq examples (one per row), or instruction-like lengths to pack."""
    from bench.workload import write_data

    rows = cell.batch * steps + 2
    if cell.data == "fixed":
        path = workdir / f"data-fixed-{cell.seq}-{rows}.jsonl"
        if not path.exists():
            # a quarter more words than tokens: truncation (train.max_seq_len) then cuts every example to seq
            write_data(path, "fixed", rows, int(cell.seq * 1.25))
    else:
        path = workdir / f"data-packed-{cell.seq}-{rows}.jsonl"
        if not path.exists():
            # lognormal lengths, median seq/8 (mean ~1.65x that): twice the tokens the rows need
            write_data(path, "variable", 2 * math.ceil(rows * 8 / 1.65) + 16, cell.seq)
    return path


def run_all(cells: Sequence[Cell], out: Path, workdir: Path, steps: int, deadline: float, smoke: bool) -> int:
    """Run the cells in the order given, in one worker process (restarted past a cell that kills it).

    This process never touches the GPU: the worker builds the checkpoints (on the GPU, once per shape), so no
    other process holds GPU memory while it measures.
    """
    started = time.monotonic()
    done = {r["cell"] for r in _load(out)}
    pending = [{"cell": dataclasses.asdict(cell), "checkpoint": str(workdir / f"llama-{cell.shape}"),
                "data": str(data_for(cell, steps, workdir))} for cell in cells if cell.name not in done]
    while pending and time.monotonic() - started < deadline - 20:
        job_file = workdir / "memory-jobs.json"
        job_file.write_text(json.dumps({"jobs": pending, "steps": steps, "workdir": str(workdir), "out": str(out),
                                        "smoke": smoke}))
        left = deadline - (time.monotonic() - started)
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.memory_bench", "--worker", str(job_file)], cwd=REPO,
                                  timeout=max(left, 30))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        finished = {r["cell"] for r in _load(out)}
        remaining = [j for j in pending if Cell(**j["cell"]).name not in finished]
        if not remaining or code == "timeout":
            pending = remaining
            break
        if code != 0:  # the worker died inside a cell: record that cell, go on with the next
            crashed = remaining[0]
            _append(out, {"cell": Cell(**crashed["cell"]).name, **crashed["cell"], "status": f"worker exit {code}"})
            remaining = remaining[1:]
        pending = remaining
    for job in pending:
        _append(out, {"cell": Cell(**job["cell"]).name, **job["cell"], "status": "not run (deadline)"})
    print(report(_load(out)), flush=True)
    return 0 if any(r.get("status") == "ok" for r in _load(out)) else 1


def _load(path: Path) -> List[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() and path.read_text().strip() else []


def _append(path: Path, row: Dict[str, Any]) -> None:
    rows = [r for r in _load(path) if r.get("cell") != row.get("cell")] + [row]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


# ---- the worker: load each group once, measure each cell -------------------------------------------------

def worker(job_path: Path) -> int:
    from trainer.log import configure_logging

    configure_logging()
    spec = json.loads(job_path.read_text())
    out = Path(spec["out"])
    context = _cuda_context()
    by_group: Dict[str, List[Dict[str, Any]]] = {}
    for job in spec["jobs"]:
        by_group.setdefault(Cell(**job["cell"]).group, []).append(job)
    from bench.workload import build_checkpoint

    for jobs in by_group.values():
        shape = Cell(**jobs[0]["cell"]).shape
        if not (Path(jobs[0]["checkpoint"]) / "config.json").exists():
            built = time.monotonic()
            build_checkpoint(shape, Path(spec["workdir"]))
            free_memory()
            print(f"memory_bench: checkpoint {shape} built in {time.monotonic() - built:.0f}s", flush=True)
        # peft's forward first: the fused branch leaves recompute hooks on the base model's norms and MLPs.
        jobs.sort(key=lambda j: j["cell"]["fused"])
        _run_group(jobs, spec, out, context)
    return 0


def _cuda_context() -> Dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": f"CPU only (torch {torch.__version__})"}
    torch.cuda.init()
    torch.empty(1, device="cuda")  # creates the context and the allocator's first block
    free, total = torch.cuda.mem_get_info()
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu_total_bytes": total, "context_bytes": total - free - torch.cuda.memory_reserved()}


def _run_group(jobs: List[Dict[str, Any]], spec: Dict[str, Any], out: Path, context: Dict[str, Any]) -> None:
    import torch

    from trainer import speed
    from trainer.compose import compose
    from trainer.model import load_model, load_tokenizer, prepare_for_training
    from trainer.plan import build_plan

    first = Cell(**jobs[0]["cell"])
    cfg0 = compose(first.overrides(jobs[0]["checkpoint"], jobs[0]["data"], spec["workdir"], spec["steps"]))
    started = time.monotonic()
    try:
        plan0 = build_plan(cfg0, run_dir=tempfile.mkdtemp(dir=spec["workdir"]))
        tokenizer = load_tokenizer(plan0.model)
        model = load_model(plan0)
        model = prepare_for_training(model, plan0.model, plan0.quant.trains_quantized,
                                     plan0.speed.gradient_checkpointing)
        model = speed.apply(model, plan0.speed, plan0.model.upcast_layernorm)
    except Exception as err:  # noqa: BLE001  (a backend that cannot load here loses its cells, not the run)
        for job in jobs:
            _append(out, {"cell": Cell(**job["cell"]).name, **job["cell"],
                          "status": f"error loading {first.group}: {type(err).__name__}: {str(err)[:300]}"})
        print(f"memory_bench: {first.group} failed to load: {err}", flush=True)
        free_memory()
        return
    load_s = time.monotonic() - started
    base_allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    print(f"memory_bench: {first.group} loaded in {load_s:.0f}s", flush=True)
    for job in jobs:
        cell = Cell(**job["cell"])
        row: Dict[str, Any] = {"cell": cell.name, **dataclasses.asdict(cell), "group_load_s": round(load_s, 1),
                               **{f"ctx_{k}": v for k, v in context.items()}, "commit": _commit()}
        attached: Dict[str, Any] = {}
        try:
            row.update(_run_cell(model, tokenizer, cell, job, spec, attached))
        except Exception as err:  # noqa: BLE001  (record and go on: one cell must not lose the others)
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        finally:
            model = _unload(attached.pop("model", None), model)
        if torch.cuda.is_available():
            row["leaked_bytes"] = torch.cuda.memory_allocated() - base_allocated
        _append(out, row)
        print(f"memory_bench: {cell.name}: {_summary(row)}", flush=True)
    del model
    free_memory()


def _run_cell(model: Any, tokenizer: Any, cell: Cell, job: Dict[str, Any], spec: Dict[str, Any],
              attached: Dict[str, Any]) -> Dict[str, Any]:
    """Attach a fresh adapter to the loaded base model, train the cell's steps, measure; `attached` gets the
    adapted model, which the caller unloads whatever happens."""
    import torch
    from transformers import Trainer, TrainingArguments

    from trainer import memory, speed
    from trainer.adapters import attach
    from trainer.compose import compose
    from trainer.data.prepare import training_data
    from trainer.plan import build_plan
    from trainer.strategies import strategy_for

    cfg = compose(cell.overrides(job["checkpoint"], job["data"], spec["workdir"], spec["steps"]))
    cuda = torch.cuda.is_available()
    predicted = memory.predict(cfg, device="cuda" if cuda else "cpu", packed_rows=cell.data == "packed")
    row: Dict[str, Any] = {"predicted_peak_bytes": predicted.train_peak_bytes,
                           "predicted_static_bytes": _static_before_step(predicted),
                           "predicted_phase": _train_phase(predicted), "prediction": predicted.to_dict()}
    if cuda and predicted.train_peak_bytes > 0.92 * torch.cuda.mem_get_info()[1]:
        return {**row, "status": "skipped: predicted above this GPU"}
    plan = build_plan(cfg, run_dir=tempfile.mkdtemp(dir=spec["workdir"]))
    train_set, _, collator = training_data(plan.data, tokenizer)
    adapted = attached["model"] = speed.apply_to_adapter(attach(model, plan.peft, plan.model), plan.speed)
    meter = _Meter()
    outliers = _Int8Outliers(adapted)
    extra = strategy_for(plan.strategy.name).training_arguments(plan.strategy, plan.run_dir, plan.device)
    args = TrainingArguments(**{**plan.training_args, **extra, "eval_on_start": False})
    trainer = Trainer(model=adapted, args=args, train_dataset=train_set, data_collator=collator,
                      processing_class=tokenizer,
                      callbacks=[*speed.callbacks(plan.speed), meter.callback(), outliers.callback()])
    started = time.monotonic()
    try:
        trainer.train()
        status = "ok"
    except torch.OutOfMemoryError:
        status = "out of memory"
    row.update({"status": status, "train_s": round(time.monotonic() - started, 1), **meter.result(),
                "tokens_per_step": cell.batch * cell.seq, "checkpoint_layers_plan": plan.speed.checkpoint_layers,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]})
    share = outliers.share()
    if share is not None:
        # The outlier columns bnb 8-bit keeps twice depend on this checkpoint's weights (random here): the row
        # is predicted with the share measured in its first step, and says what the default would predict.
        remeasured = memory.predict(cfg, device="cuda" if cuda else "cpu", packed_rows=cell.data == "packed",
                                    int8_outlier_share=share)
        row.update({"int8_outlier_share": share, "predicted_peak_bytes_default_share": row["predicted_peak_bytes"],
                    "predicted_peak_bytes": remeasured.train_peak_bytes,
                    "predicted_phase": _train_phase(remeasured), "prediction": remeasured.to_dict()})
    if not cuda:
        row["measured_static_bytes"] = _model_bytes(adapted)
    trainer.accelerator.free_memory()  # accelerate keeps the prepared model and optimizer referenced
    del trainer, adapted
    return row


class _Meter:
    """Peak allocated/reserved over the training steps (reset as training begins) and per step."""

    def __init__(self) -> None:
        self.step_peaks: List[int] = []
        self.reserved = 0
        self.static = 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                meter.begin()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                meter.step()

        return _Callback()

    def begin(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.static = torch.cuda.memory_allocated()

    def step(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.step_peaks.append(torch.cuda.max_memory_allocated())
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> Dict[str, Any]:
        import torch

        if not torch.cuda.is_available():
            return {"measured_peak_bytes": None}
        peaks = self.step_peaks + [torch.cuda.max_memory_allocated()]  # an incomplete last step (OOM) too
        return {"measured_peak_bytes": max(peaks), "measured_reserved_bytes": max(self.reserved,
                                                                                   torch.cuda.max_memory_reserved()),
                "measured_static_bytes": self.static, "step_peak_bytes": self.step_peaks}


class _Int8Outliers:
    """For bnb 8-bit: the share of down_proj's input columns over LLM.int8's outlier threshold, in the first
    training step (the columns bitsandbytes keeps a second time for backward; trainer.memory's term)."""

    def __init__(self, model: Any) -> None:
        self.shares: List[float] = []
        self.handles = []
        for name, module in model.named_modules():
            # bitsandbytes' own layer (peft's LoRA wrapper has the same class name and the same input)
            if type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes") \
                    and ".down_proj" in name:
                self.handles.append(module.register_forward_pre_hook(self._record))

    def _record(self, module: Any, args: tuple) -> None:
        import torch

        threshold = float(getattr(getattr(module, "state", None), "threshold", 6.0) or 6.0)
        with torch.no_grad():
            inputs = args[0].reshape(-1, args[0].shape[-1])
            self.shares.append((inputs.abs() > threshold).any(0).float().mean().item())

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                meter.stop()

        return _Callback()

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def share(self) -> Optional[float]:
        self.stop()
        return statistics.mean(self.shares) if self.shares else None


def _static_before_step(p: Any) -> float:
    """What is allocated when training begins: weights and adapters, not yet gradients or optimizer state."""
    return sum(t.bytes for t in p.static if not t.name.startswith(("optimizer", "DeepSpeed", "ZeRO", "DDP")))


def _train_phase(p: Any) -> str:
    from trainer.memory import TRAIN_PHASES

    phases = [ph for ph in p.phases if ph.name in TRAIN_PHASES]
    return max(phases, key=p.total).name if phases else ""


def _model_bytes(model: Any) -> int:
    """CPU: the storage behind parameters, buffers and bnb/hqq quantization constants, each storage once."""
    import torch

    seen, total = set(), 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code, getattr(state, "offset", None)):
                add(part)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(tensor, "SCB", None))
    for module in model.modules():
        if hasattr(module, "W_q"):  # HQQLinear: scale and zero live in its meta dict
            for value in module.meta.values():
                add(value)
    return total


def _unload(adapted: Any, base: Any) -> Any:
    """The base model again: the adapter removed (peft's unload), checkpointing off, memory returned."""
    if adapted is not None and hasattr(adapted, "unload"):
        base = adapted.unload()
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    free_memory()
    return base


def _commit() -> str:
    """The commit measured: QFORGE_COMMIT (a copied working tree has no .git), else git's."""
    if os.environ.get("QFORGE_COMMIT"):
        return os.environ["QFORGE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _summary(row: Dict[str, Any]) -> str:
    measured, predicted = row.get("measured_peak_bytes"), row.get("predicted_peak_bytes")
    if measured and predicted:
        return (f"{row['status']}, measured {measured / GIB:.2f} GiB, predicted {predicted / GIB:.2f} GiB "
                f"({predicted / measured - 1:+.1%})")
    return str(row.get("status"))


# ---- the report -------------------------------------------------------------------------------------------

def report(rows: List[Dict[str, Any]]) -> str:
    """The docs/memory.md table: measured vs predicted per cell, the error statistics and calibration hints."""
    if not rows:
        return "no results"
    first = rows[0]
    where = first.get("ctx_device", "?")
    if first.get("ctx_cuda"):
        where += f" (torch {first.get('ctx_torch')}, CUDA {first.get('ctx_cuda')})"
    lines = [f"Measured at commit `{first.get('commit', '?')}` on {where}: `torch.cuda.max_memory_allocated` over "
             "the training steps against `trainer.memory.predict`; *weights* is what was allocated when training "
             "began (measured / predicted).", "",
             "| cell | shape | quant | seq | batch | ckpt layers | LoRA | rows | weights GiB | measured GiB "
             "| predicted GiB | error | predicted peak at | status |",
             "|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---|---|"]
    errors = []
    for row in rows:
        measured, predicted = row.get("measured_peak_bytes"), row.get("predicted_peak_bytes")
        error = ""
        if measured and predicted and row.get("status") == "ok":
            errors.append(predicted / measured - 1)
            error = f"{errors[-1]:+.1%}"
        ckpt = "all" if row.get("ckpt") is None else row.get("ckpt")
        lines.append(f"| {row['cell']} | {row.get('shape')} | {row.get('quant')} | {row.get('seq')} | "
                     f"{row.get('batch')} | {ckpt} | {'fused' if row.get('fused') else 'peft'} | "
                     f"{'packed' if row.get('data') == 'packed' else 'one per row'} | "
                     f"{_gib(row.get('measured_static_bytes'))} / {_gib(row.get('predicted_static_bytes'))} | "
                     f"{_gib(measured)} | {_gib(predicted)} | {error} | {row.get('predicted_phase', '')} | "
                     f"{row.get('status')} |")
    lines.append("")
    if errors:
        absolute = [abs(e) for e in errors]
        within = sum(a <= 0.10 for a in absolute)
        met = within == len(errors) and statistics.median(absolute) <= 0.05
        lines.append(f"{len(errors)} cells measured: median |error| {statistics.median(absolute):.1%}, max "
                     f"{max(absolute):.1%}, {within} of {len(errors)} within 10% (targets: every cell within 10%, "
                     f"median within 5%: {'met' if met else 'NOT met'}).")
        ok = [r for r in rows if r.get("status") == "ok" and r.get("measured_peak_bytes")]
        residual = statistics.median((r["measured_peak_bytes"] - r["predicted_peak_bytes"]) / GIB for r in ok)
        overhead = [r["measured_reserved_bytes"] / r["measured_peak_bytes"] - 1 for r in ok
                    if r.get("measured_reserved_bytes")]
        static = [r["measured_static_bytes"] / r["predicted_static_bytes"] - 1 for r in ok
                  if r.get("measured_static_bytes") and r.get("predicted_static_bytes")]
        context = first.get("ctx_context_bytes")
        lines += ["", "Calibration hints (trainer/memory.py CALIBRATION): median measured - predicted "
                  f"{residual:+.3f} GiB (fixed_gib); reserved / allocated - 1 at the peak: median "
                  f"{statistics.median(overhead) if overhead else float('nan'):.1%}, max "
                  f"{max(overhead) if overhead else float('nan'):.1%} (allocator_overhead); CUDA context "
                  f"{context / GIB if context else float('nan'):.2f} GiB (cuda_context_gib); weights when training "
                  f"begins vs predicted: median {statistics.median(static) if static else float('nan'):+.1%}."]
    return "\n".join(lines)


def _gib(value: Any) -> str:
    if not value:
        return "-"
    return f"{value / GIB:.2f}" if value >= 0.1 * GIB else f"{value / GIB:.4f}"


BEGIN, END = "<!-- memory-bench:begin -->", "<!-- memory-bench:end -->"


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {doc} lacks the {BEGIN} / {END} markers; restore them around the results section.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "memory.json"))
    parser.add_argument("--report", metavar="RESULTS", help="render the table of a results file and exit")
    parser.add_argument("--write", metavar="DOC", help="with --report: replace the results section of DOC")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: the tiny shape, a few cells")
    parser.add_argument("--cells", default="", help="comma list of cell names or groups (e.g. 8b-bnb4) to run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="checkpoints and data (default /dev/shm or a temp dir)")
    parser.add_argument("--deadline", type=float, default=500, help="seconds for the whole run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker))
    if args.report:
        table = report(_load(Path(args.report)))
        if args.write:
            write_doc(Path(args.write), table)
        print(table)
        return 0
    cells = smoke_grid() if args.smoke else grid()
    if args.cells:
        wanted = set(args.cells.split(","))
        cells = [c for c in cells if c.name in wanted or c.group in wanted]
    workdir = Path(args.workdir or _default_workdir(args.smoke))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"memory_bench: {len(cells)} cells, {args.steps} steps each, workdir {workdir}, results {out}", flush=True)
    return run_all(cells, out, workdir, 2 if args.smoke else args.steps, args.deadline, args.smoke)


def _default_workdir(smoke: bool) -> str:
    shm = Path("/dev/shm")
    if not smoke and shm.is_dir() and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > 40 * GIB:
        return str(shm / "qforge-memory")  # the 8B checkpoint is 16 GB: RAM-backed is several times faster
    return tempfile.mkdtemp(prefix="qforge-memory-")


if __name__ == "__main__":
    sys.exit(main())
