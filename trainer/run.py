"""One training run on one rank, top to bottom: preflight, data, model, adapter, train, outputs.

Read this file to follow a run without a debugger. Launchers call `train(cfg, plan)` in every rank.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import Any, Dict

from trainer import preflight
from trainer.data import ExampleDataset, PadCollator, load_examples
from trainer.model import load_for_training, load_tokenizer, model_source
from trainer.plan import RunPlan
from trainer.rundir import resolved_config
from trainer.tracking import make_wandb_callback, plot_losses, write_metrics

log = logging.getLogger(__name__)


def train(cfg: Any, plan: RunPlan) -> Dict[str, Any]:
    started = time.monotonic()
    preflight.check(cfg)

    # Data first: a bad file costs a second here, not a model load.
    tokenizer = load_tokenizer(cfg, model_source(cfg))
    train_examples, eval_examples = load_examples(cfg, tokenizer)
    log.info("data: %d train / %d eval examples from %s", len(train_examples), len(eval_examples), cfg.data.path)

    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(cfg.seed)
    model, tokenizer = load_for_training(cfg, plan)
    args = TrainingArguments(**plan.training_args)
    callbacks = []
    wandb_cb = None
    if cfg.logger.name.value == "wandb":
        wandb_cb = make_wandb_callback(cfg, plan, resolved_config(cfg))
        callbacks.append(wandb_cb)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_examples),
        eval_dataset=ExampleDataset(eval_examples) if eval_examples else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=callbacks,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    metrics: Dict[str, Any] = {}
    if cfg.do_eval:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    if cfg.do_train:
        train_started = time.monotonic()
        result = trainer.train()
        train_seconds = time.monotonic() - train_started
        tokens = int(trainer.state.num_input_tokens_seen)
        metrics.update({
            "train_loss": result.training_loss,
            "steps": trainer.state.global_step,
            "train_tokens": tokens,
            "train_seconds": train_seconds,
            "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        })
    if cfg.do_eval:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    metrics.update(_memory())
    metrics["world_size"] = plan.world_size
    metrics["wall_seconds"] = time.monotonic() - started
    if trainer.is_world_process_zero():
        _save_outputs(cfg, plan, trainer, tokenizer, metrics)
        if wandb_cb is not None:
            wandb_cb.finish(metrics)
    return metrics


def _memory() -> Dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    # On CPU the process's peak resident set is the honest figure (ru_maxrss is in KiB on Linux).
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "cpu_max_rss"}


def _save_outputs(cfg: Any, plan: RunPlan, trainer: Any, tokenizer: Any, metrics: Dict[str, Any]) -> None:
    adapter_based = cfg.peft.method.value not in ("full", "freeze")
    target = os.path.join(plan.run_dir, "adapter" if adapter_based else "model")
    if cfg.do_train:
        trainer.save_model(target)
        tokenizer.save_pretrained(target)
        metrics["saved_to"] = target
    plot = plot_losses(plan.run_dir, trainer.state.log_history,
                       f"{plan.run_name}: {cfg.quant.method.value} {cfg.peft.method.value} {cfg.strategy.name.value}")
    if plot:
        metrics["loss_plot"] = str(plot)
    metrics["log_history"] = trainer.state.log_history
    path = write_metrics(plan.run_dir, metrics)
    log.info("metrics: %s", path)
