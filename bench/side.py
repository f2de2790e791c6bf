"""One side of the benchmark in its own process: `python -m bench.side <job.json>`.

A process per side keeps GPU memory peaks apart and keeps qforge's kernel patches (liger replaces
module-level functions) away from the baseline. The job file says which checkpoint, which work items
and (for qforge) which override sets to run; results go to the job's `out` JSON.

The baseline is written the way the transformers/peft QLoRA docs show: BitsAndBytesConfig (nf4,
double quant, bf16 compute), prepare_model_for_kbit_training, LoraConfig(r=16, all-linear), the HF
Trainer with gradient checkpointing, and DataCollatorForSeq2Seq padding each batch to its longest.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

IGNORE_INDEX = -100
DROPOUT = 0.05  # LoRA dropout of the baseline and qforge sides unless the job says (--trajectory: 0)


def qforge_overrides(job: Dict[str, Any], item: Dict[str, Any], extra: List[str]) -> List[str]:
    """The qforge run for a work item: same model, data, batch, sequence length and LoRA config."""
    return [
        "model=local", f"model.name_or_path={job['checkpoint']}", "quant=bnb4", "peft=lora", "peft.r=16",
        "peft.alpha=32", f"peft.dropout={job.get('dropout', DROPOUT)}", "data=alpaca", f"data.path={item['data']}",
        f"train.max_seq_len={item['max_len']}", f"train.batch_size={item['batch']}",
        f"train.max_steps={job['warmup'] + job['steps']}", "train.logging_steps=1", "train.save_steps=100000",
        # the baseline's schedule (TrainingArguments' defaults): linear decay, no warm-up
        "train.scheduler=linear", "train.warmup_ratio=0", "do_eval=false", "logger=none",
        f"output_root={job['workdir']}/runs",
        *extra,
    ]


def examples_for(job: Dict[str, Any], item: Dict[str, Any]) -> tuple:
    """qforge's own tokenization of the item's data: both sides train on exactly these token ids."""
    from trainer.compose import compose
    from trainer.data.prepare import examples
    from trainer.model import load_tokenizer
    from trainer.plan import build_plan

    plan = build_plan(compose(qforge_overrides(job, item, [])))
    tokenizer = load_tokenizer(plan.model)
    train, _ = examples(plan.data, tokenizer)
    return train, tokenizer


def probe_batches(cfg: Any, tokenizer: Any, examples: List[Any]) -> tuple:
    """The probe examples as the run batches them: packed rows (train.packing) or padded examples."""
    from trainer.data import ExampleDataset, PadCollator
    from trainer.data.spec import VARLEN_ATTENTION
    from trainer.packing import PackedCollator, PackedDataset

    if not cfg.train.packing:
        return ExampleDataset(examples), PadCollator(tokenizer.pad_token_id)
    flatten = cfg.model.attn_implementation in VARLEN_ATTENTION
    return (PackedDataset(examples, int(cfg.train.max_seq_len), seed=cfg.data.split_seed),
            PackedCollator(tokenizer.pad_token_id, flatten=flatten))


def probe_loss(model: Any, batch: Dict[str, Any]) -> float:
    """The loss on one fixed batch, in training mode (the path training takes) without updating anything."""
    import torch

    model.train()
    device = next(p.device for p in model.parameters())
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return float(model(**batch).loss)


class Meter:
    """Step times (the GPU timeline between step ends on CUDA, the host clock on CPU), non-padding tokens per step,
    peak memory, and a fixed-batch loss."""

    def __init__(self, pad_token_id: int, probe_batch: Optional[Dict[str, Any]], warmup: int):
        self.pad = pad_token_id
        self.probe_batch = probe_batch
        self.warmup = warmup
        self.ends: List[float] = []
        self.events: List[Any] = []
        self.tokens: List[Any] = []  # per step; device tensors until end()
        self.pending = 0
        self.probe_loss = float("nan")
        self.peak_bytes = 0
        self.hook = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                meter.begin(model)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                meter.step_end()

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                meter.end()

        return _Callback()

    def _count(self, module: Any, args: Any, kwargs: Dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training:
            self.pending = self.pending + (ids != self.pad).sum()  # on the ids' device: read back at the end

    def begin(self, model: Any) -> None:
        import torch

        if self.probe_batch is not None:
            self.probe_loss = probe_loss(model, self.probe_batch)
        self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._sync()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.ends = [time.perf_counter()]
        self.events = [self._event()]

    @staticmethod
    def _event() -> Any:
        """A CUDA event recorded where the CPU is in the stream (no sync); None on CPU."""
        import torch

        if not torch.cuda.is_available():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step_end(self) -> None:
        # No sync here: a meter that waits for the GPU at every step end (as this one did up to run 7) takes from
        # each side whatever CPU work it overlaps with the GPU's backlog (trainer/step_syncs.py). A step's time is
        # the GPU timeline between the events recorded at consecutive step ends, idle gaps included.
        self.ends.append(time.perf_counter())
        self.events.append(self._event())
        self.tokens.append(self.pending)
        self.pending = 0

    def end(self) -> None:
        import torch

        if self.hook is not None:
            self.hook.remove()
        self._sync()
        self.tokens = [int(t) for t in self.tokens]
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()
            if all(e is not None for e in self.events):
                # the GPU's step times (ms -> s), in place of the host clock's
                seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(self.events[:-1], self.events[1:], strict=True)]
                self.ends = [0.0]
                for step in seconds:
                    self.ends.append(self.ends[-1] + step)

    def summary(self) -> Dict[str, Any]:
        times = [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=True)]
        measured = list(range(self.warmup, len(times)))
        if not measured:
            raise RuntimeError(f"only {len(times)} steps ran; need more than {self.warmup} warm-up steps")
        step_times = [times[i] for i in measured]
        rates = [self.tokens[i] / times[i] for i in measured]
        return {
            "tokens_per_s": statistics.median(rates),
            "step_s": statistics.median(step_times),
            "tokens_per_step": statistics.median(self.tokens[i] for i in measured),
            "peak_gib": self.peak_bytes / 2**30,
            "probe_loss": self.probe_loss,
            "measured_steps": len(measured),
        }


def _baseline_rows(examples: List[Any]) -> List[Dict[str, Any]]:
    return [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
            for e in examples]


def run_baseline(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from trainer.compose import compose

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32  # bnb's CPU path computes in fp32
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], quantization_config=bnb_config,
                                                 dtype=compute, device_map={"": 0} if cuda else None)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=job.get("dropout", DROPOUT), target_modules="all-linear",
                      bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    results = []
    data = {}
    for item in job["items"]:
        examples, tokenizer = examples_for(job, item)
        # The fixed-batch probe takes the first examples as they come, as qforge's probe does; training takes
        # them in qforge's row order.
        probe_rows = _baseline_rows(examples[: item["batch"]])
        rows = _baseline_rows(in_training_order(examples, compose(qforge_overrides(job, item, []))))
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, return_tensors="pt")
        # Every item's fixed-batch loss is taken before any training, on the freshly adapted model.
        data[item["name"]] = (rows, collator, tokenizer, probe_loss(model, collator(probe_rows)))
    for index, item in enumerate(job["items"]):
        if index:
            fresh_adapter(model)  # every item trains from the same starting point, as qforge's runs do
        rows, collator, tokenizer, loss = data[item["name"]]
        meter = Meter(tokenizer.pad_token_id, None, job["warmup"])
        meter.probe_loss = loss
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(dir=job["workdir"]), per_device_train_batch_size=item["batch"],
            gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, learning_rate=2e-4,
            max_steps=job["warmup"] + job["steps"], logging_steps=1, save_strategy="no", report_to=[],
            seed=42, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                          callbacks=[meter.callback()])
        trainer.train()
        results.append({"side": "baseline", "item": item["name"], "variant": "HF Trainer + peft",
                        "lora_dropout": model.peft_config["default"].lora_dropout,
                        **meter.summary(), **losses_of(trainer.state.log_history)})
        del trainer
        free_memory()
    return results


def run_qforge(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    from trainer import run as qforge_run
    from trainer.compose import compose
    from trainer.plan import build_plan
    from trainer.validate import validate

    results = []
    for item, variant in run_order(job["items"]):
        cfg = compose(qforge_overrides(job, item, variant["overrides"]))
        report = validate(cfg)
        if not report.ok:
            raise SystemExit(f"qforge rejected {variant}: {[v.line() for v in report.errors]}")
        examples, tokenizer = examples_for(job, item)
        plan = build_plan(cfg)
        # The probe batch goes through qforge's own batching path (packed rows or padded).
        probe_set, collator = probe_batches(cfg, tokenizer, examples[: item["batch"]])
        meter = Meter(tokenizer.pad_token_id, collator([probe_set[i] for i in range(len(probe_set))]),
                      job["warmup"])
        metrics = qforge_run.train(plan, extra_callbacks=[meter.callback()])
        results.append({"side": "qforge", "item": item["name"], "variant": variant["name"],
                        "overrides": variant["overrides"], "lora_dropout": plan.peft.kwargs.get("lora_dropout"),
                        "predicted_gib": plan.memory.get("peak_allocated_gib"), **meter.summary(),
                        **losses_of(metrics.get("log_history", []))})
        free_memory()
    return results


def liger_off(overrides: List[str]) -> bool:
    """Whether a qforge variant runs its layers without liger's kernels (train.compile turns them off too)."""
    return "model.liger=false" in overrides or "train.compile=true" in overrides


def run_order(items: List[Dict[str, Any]]) -> List[tuple]:
    """(item, variant) in the order one process runs them: liger's patches outlive the model they were applied
    to, so every liger-off variant of every item goes first; otherwise the order given."""
    pairs = [(item, variant) for item in items for variant in item["variants"]]
    return sorted(pairs, key=lambda pair: not liger_off(pair[1]["overrides"]))


def fresh_adapter(model: Any, seed: int = 42) -> int:
    """Re-initialise every LoRA adapter in place (A random, B zero: the model's output is the base model's again).

    The baseline and unsloth sides load once and train several items; without this each item would start from
    the previous one's adapter and their per-step losses would not be comparable with qforge's fresh runs.
    """
    import torch

    torch.manual_seed(seed)
    count = 0
    for module in model.modules():
        reset = getattr(module, "reset_lora_parameters", None)
        if reset is not None and getattr(module, "lora_A", None):
            for name in list(module.lora_A.keys()):
                reset(name, True)
                count += 1
    return count


def losses_of(log_history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The training loss and learning rate of every logged step (logging_steps=1), from a Trainer's log history."""
    logged = [h for h in log_history if "loss" in h]
    losses = [float(h["loss"]) for h in logged]
    return {"first_loss": losses[0] if losses else float("nan"), "losses": losses,
            "lrs": [float(h.get("learning_rate", float("nan"))) for h in logged]}


def in_training_order(examples: List[Any], cfg: Any) -> List[Any]:
    """The examples in the order of the rows qforge trains on (its packed bins), for the baseline's dataset.

    Both sides' HF Trainers shuffle with seed 42: over datasets of the same rows in the same order they draw the
    same batches, so per-step losses compare like for like. That holds exactly where every packed row is one
    example (fixed-length items); with several per row (b), the order is the bins' and the batches differ anyway.
    """
    from trainer.packing import pack_lengths

    if not cfg.train.packing:
        return list(examples)
    flat, _ = pack_lengths([len(e.input_ids) for e in examples], int(cfg.train.max_seq_len),
                           seed=cfg.data.split_seed)
    return [examples[int(i)] for i in flat]


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    if job["side"] == "unsloth":
        from bench.unsloth_side import run_unsloth

        results = run_unsloth(job)  # imports unsloth before transformers: no qforge import before this line
    else:
        from trainer.log import configure_logging

        configure_logging()
        results = run_baseline(job) if job["side"] == "baseline" else run_qforge(job)
    with open(job["out"], "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
