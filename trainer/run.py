"""One training run on one rank, top to bottom: preflight, data, model, adapter, train, outputs.

Read this file to follow a run without a debugger. It takes the RunPlan (trainer/plan.py) and nothing else
decides anything here: trainer/rank.py (every rank under torchrun and Slurm) and launchers/local.py call
`train(plan)`.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from trainer import checkpoints, preemption, preflight, speed, step_syncs
from trainer.data.prepare import training_data
from trainer.errors import UserError
from trainer.model import load_for_training, load_tokenizer
from trainer.run_loss import NothingLeftToTrain, loss_callback
from trainer.rundir import saved_config
from trainer.specs import RunPlan
from trainer.strategies import strategy_for
from trainer.tracking import make_wandb_callback, plot_losses, wandb_mode, write_metrics

log = logging.getLogger(__name__)


def train(plan: RunPlan, extra_callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    started = time.monotonic()
    preflight.check(plan)
    if plan.device == "cpu":
        # Named, not detected: DeepSpeed (imported by the Trainer) otherwise warns that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # Decided before anything heavy: with logger.mode=online and no route to wandb, the run stops here.
    logs_to = wandb_mode(plan.logger.mode, plan.run_dir) if plan.logger.name == "wandb" and rank0 else None

    # Data first: a bad file costs a second here, not a model load. Rank 0 tokenizes (once per data
    # fingerprint, cached on disk); the other ranks wait and memory-map the same cache. Packed rows
    # (train.packing) or padded examples; packing.py says why either is the same loss.
    tokenizer = load_tokenizer(plan.model)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    train_set, eval_set, collator = training_data(plan.data, tokenizer, rank=rank, world_size=world)
    _record_data(plan.run_dir, rank, train_set)

    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(plan.run.seed)
    model, tokenizer = load_for_training(plan)
    strategy = strategy_for(plan.strategy.name)
    strategy.prepare_process_group(plan.strategy, plan.device)
    metrics: Dict[str, Any] = {}
    key = checkpoints.signing_key(plan.run.output_root)
    resume_from = checkpoints.resume_path(plan.run.resume, plan.run_dir, key) if plan.run.do_train else None
    training_args = strategy.training_arguments(plan.strategy, plan.run_dir, plan.device)
    if resume_from:
        training_args["eval_on_start"] = False  # the first attempt's eval before training is in the log history
    args = TrainingArguments(**{**plan.training_args, **training_args})
    # Order matters in on_save: the loss sum is written into the checkpoint before it is marked complete,
    # and preemption exits only once it is.
    run_loss = loss_callback(resume_from)
    callbacks = [run_loss, checkpoints.completeness_callback(plan.run.save_total_limit, key),
                 _weights_memory(metrics), preemption.preemption_callback(plan.launcher.preemption_signal,
                                                                          plan.run_dir),
                 *speed.callbacks(plan.speed), *_plugged_in(plan), *extra_callbacks]
    wandb_cb = None
    if plan.logger.name == "wandb":
        wandb_cb = make_wandb_callback(plan, saved_config(plan.run_dir), logs_to or "disabled")
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
    run_loss.attach(trainer)
    # Last: it reads the tokens-seen count back on the steps the other callbacks decided to log, save or stop at.
    trainer.add_callback(step_syncs.install(trainer, world))
    samples = _samples(plan, train_set, tokenizer)
    if samples is not None:
        trainer.add_callback(samples)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    if plan.run.do_train:
        if resume_from:
            log.info("resuming from %s", resume_from)
            metrics["resumed_from_step"] = checkpoints.step_of(Path(resume_from))
        train_started = time.monotonic()
        try:
            trainer.train(resume_from_checkpoint=resume_from)
        except NothingLeftToTrain:
            log.info("%s is the run's last step: nothing left to train", resume_from)
        train_seconds = time.monotonic() - train_started
        tokens = int(trainer.state.num_input_tokens_seen)
        metrics.update({
            # The whole run's mean step loss over the ranks, also after a resume (run_loss.py says how).
            "train_loss": run_loss.train_loss(trainer.state.global_step),
            "steps": trainer.state.global_step,
            "train_tokens": tokens,
            "train_seconds": train_seconds,
            "tokens_per_second": tokens / train_seconds if train_seconds > 0 else 0.0,
        })
    if plan.run.do_eval:
        before = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == 0]
        if before:
            metrics["eval_loss_before"] = before[0]
            metrics["eval_perplexity_before"] = perplexity(before[0])
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    if samples is not None and trainer.is_world_process_zero():
        written = samples.write_after(trainer.model, trainer.args.device)
        if written:
            metrics["samples"] = str(written)

    metrics.update(_memory())
    metrics["world_size"] = plan.world_size
    metrics["versions"] = {**plan.versions, **preflight.machine_facts()}
    metrics["wall_seconds"] = time.monotonic() - started
    # A collective save first: FSDP and ZeRO-3 need every rank to gather the weights.
    if plan.run.do_train:
        strategy.save_final(trainer, weights_dir(plan))
    if trainer.is_world_process_zero():
        _save_outputs(plan, trainer, tokenizer, metrics)
        if wandb_cb is not None:
            wandb_cb.finish(metrics)
    return metrics


def _samples(plan: RunPlan, train_set: Any, tokenizer: Any) -> Any:
    """eval.samples: the callback that answers held-out prompts before and after training (trainer/samples.py)."""
    if plan.run.eval_samples <= 0:
        return None
    from trainer.data.sets import TokenizedRows
    from trainer.samples import samples_callback

    prepared = getattr(train_set, "prepared", None)
    rows = TokenizedRows(prepared.table, prepared.eval_index, prepared.lengths) \
        if prepared is not None and len(prepared.eval_index) else None
    return samples_callback(plan, rows, tokenizer)


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


def perplexity(loss: float) -> float:
    """exp(mean token loss); capped so a diverged run reports a large number, not an overflow."""
    return math.exp(min(loss, 50.0))


def _plugged_in(plan: RunPlan) -> List[Any]:
    """train.callbacks: "module:function" factories, each called with the plan, each giving a TrainerCallback."""
    made = []
    for spec in plan.run.callbacks:
        module_name, _, function_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"train.callbacks lists {spec}, which cannot be imported ({err}); name a "
                            "module:function on this machine's Python path.") from None
        made.append(factory(plan))
    return made


def _weights_memory(metrics: Dict[str, Any]) -> Any:
    """Per-GPU memory once the strategy has wrapped (sharded) the model, before the first step.

    That figure is the weights (+ adapters) each GPU holds: FSDP and ZeRO-3 shards show up as a fraction
    of the single-GPU figure. Written into `metrics` as weights_memory_bytes (CUDA only).
    """
    from transformers import TrainerCallback

    class WeightMemory(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                metrics["weights_memory_bytes"] = int(torch.cuda.memory_allocated())

    return WeightMemory()


def _memory() -> Dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    # On CPU the process's peak resident set is the honest figure (ru_maxrss is in KiB on Linux).
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "cpu_max_rss"}


def weights_dir(plan: RunPlan) -> str:
    """adapter/ for adapter methods; model/ where the base weights themselves were trained."""
    return os.path.join(plan.run_dir, "adapter" if plan.peft.trains_adapter else "model")


def _save_outputs(plan: RunPlan, trainer: Any, tokenizer: Any, metrics: Dict[str, Any]) -> None:
    target = weights_dir(plan)
    if plan.run.do_train:
        tokenizer.save_pretrained(target)  # the weights were saved by the strategy's save_final on every rank
        metrics["saved_to"] = target
    plot = plot_losses(plan.run_dir, trainer.state.log_history,
                       f"{plan.run_name}: {plan.quant.method} {plan.peft.method} {plan.strategy.name}",
                       eval_before=metrics.get("eval_loss_before"))
    if plot:
        metrics["loss_plot"] = str(plot)
    metrics["log_history"] = trainer.state.log_history
    path = write_metrics(plan.run_dir, metrics)
    log.info("metrics: %s", path)
