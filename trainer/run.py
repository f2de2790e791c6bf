"""One training run on one rank, top to bottom: preflight, data, model, adapter, train, outputs.

Read this file to follow a run without a debugger. Launchers call `train(cfg, plan)` in every rank.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Dict, Sequence

from trainer import checkpoints, preemption, preflight, speed, strategies
from trainer.model import load_for_training, load_tokenizer, model_source
from trainer.plan import RunPlan
from trainer.rundir import resolved_config
from trainer.tracking import make_wandb_callback, plot_losses, write_metrics

log = logging.getLogger(__name__)


def train(cfg: Any, plan: RunPlan, extra_callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    started = time.monotonic()
    preflight.check(cfg)
    if plan.device == "cpu":
        # Named, not detected: DeepSpeed (imported by the Trainer) otherwise warns that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # Data first: a bad file costs a second here, not a model load. Rank 0 tokenizes (once per data
    # fingerprint, cached on disk); the other ranks wait and memory-map the same cache. Packed rows
    # (train.packing) or padded examples; speed.py and packing.py say why either is the same loss.
    from trainer.data.prepare import training_data

    tokenizer = load_tokenizer(cfg, model_source(cfg))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    train_set, eval_set, collator = training_data(plan.data, tokenizer, rank=rank, world_size=world)
    _record_data(plan.run_dir, rank, train_set)

    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(cfg.seed)
    model, tokenizer = load_for_training(cfg, plan)
    strategies.prepare_process_group(plan)
    args = TrainingArguments(**strategies.training_arguments(plan))
    metrics: Dict[str, Any] = {}
    # Preemption after completeness: it exits in on_save, once the checkpoint is marked complete.
    callbacks = [checkpoints.completeness_callback(cfg.train.save_total_limit), strategies.memory_callback(metrics),
                 preemption.preemption_callback(cfg, plan.run_dir), *speed.callbacks(cfg), *extra_callbacks]
    wandb_cb = None
    if cfg.logger.name.value == "wandb":
        wandb_cb = make_wandb_callback(cfg, plan, resolved_config(cfg))
        callbacks.append(wandb_cb)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,  # packed rows have no attention mask: tokens seen = ids != pad
        callbacks=callbacks,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    # The Trainer cannot evaluate an FSDP2 or DeepSpeed model before train() has wrapped it together
    # with its optimizer (accelerate refuses FSDP2; DeepSpeed's inference engine breaks the training one).
    if cfg.do_eval and plan.strategy["name"] in ("single", "ddp"):
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    if cfg.do_train:
        resume_from = checkpoints.resume_path(cfg.train.resume, plan.run_dir)
        if resume_from:
            log.info("resuming from %s", resume_from)
            metrics["resumed_from_step"] = checkpoints.step_of(Path(resume_from))
        train_started = time.monotonic()
        result = trainer.train(resume_from_checkpoint=resume_from)
        train_seconds = time.monotonic() - train_started
        tokens = int(trainer.state.num_input_tokens_seen)
        metrics.update({
            # After a resume the Trainer averages only the steps of this attempt; the restored log
            # history covers the whole run, so a resumed run reports the mean of all logged losses.
            "train_loss": _whole_run_train_loss(trainer.state.log_history) if resume_from else result.training_loss,
            "steps": trainer.state.global_step,
            "train_tokens": tokens,
            "train_seconds": train_seconds,
            "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        })
    if cfg.do_eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    metrics.update(_memory())
    metrics["world_size"] = plan.world_size
    metrics["versions"] = {**plan.versions, **preflight.machine_facts()}
    metrics["wall_seconds"] = time.monotonic() - started
    # Collective saves first: FSDP and ZeRO-3 need every rank to gather the weights.
    if cfg.do_train:
        strategies.save_final(trainer, _weights_dir(cfg, plan))
        strategies.save_fixed_logits(trainer, tokenizer, os.path.join(plan.run_dir, strategies.FIXED_LOGITS_FILE))
    if trainer.is_world_process_zero():
        _save_outputs(cfg, plan, trainer, tokenizer, metrics)
        if wandb_cb is not None:
            wandb_cb.finish(metrics)
    return metrics


def _record_data(run_dir: str, rank: int, train_set: Any) -> None:
    """data/rank-<r>.json: which cache entry this rank trained on and whether it tokenized (provenance)."""
    import hashlib
    import json

    prepared = getattr(train_set, "prepared", None)
    if prepared is None:  # streaming: nothing is cached
        return
    first_rows = json.dumps([train_set[i]["input_ids"] for i in range(min(4, len(train_set)))])
    record = {"rank": rank, "cache": str(prepared.path), "key": prepared.meta["key"], "tokenized_here":
              prepared.built_here, "train_rows": len(train_set), "train_examples": len(prepared.train_index),
              "first_rows_sha256": hashlib.sha256(first_rows.encode()).hexdigest()}
    target = Path(run_dir, "data")
    target.mkdir(parents=True, exist_ok=True)
    (target / f"rank-{rank}.json").write_text(json.dumps(record, indent=2) + "\n")


def _memory() -> Dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    # On CPU the process's peak resident set is the honest figure (ru_maxrss is in KiB on Linux).
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "cpu_max_rss"}


def _weights_dir(cfg: Any, plan: RunPlan) -> str:
    """adapter/ for adapter methods; model/ where the base weights themselves were trained."""
    adapter_based = cfg.peft.method.value not in ("full", "freeze")
    return os.path.join(plan.run_dir, "adapter" if adapter_based else "model")


def _whole_run_train_loss(history: Sequence[Dict[str, Any]]) -> float:
    losses = [h["loss"] for h in history if "loss" in h]
    return sum(losses) / len(losses) if losses else float("nan")


def _save_outputs(cfg: Any, plan: RunPlan, trainer: Any, tokenizer: Any, metrics: Dict[str, Any]) -> None:
    target = _weights_dir(cfg, plan)
    if cfg.do_train:
        tokenizer.save_pretrained(target)  # the weights were saved by strategies.save_final on every rank
        metrics["saved_to"] = target
    plot = plot_losses(plan.run_dir, trainer.state.log_history,
                       f"{plan.run_name}: {cfg.quant.method.value} {cfg.peft.method.value} {cfg.strategy.name.value}",
                       eval_before=metrics.get("eval_loss_before"))
    if plot:
        metrics["loss_plot"] = str(plot)
    metrics["log_history"] = trainer.state.log_history
    path = write_metrics(plan.run_dir, metrics)
    log.info("metrics: %s", path)
