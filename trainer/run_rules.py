"""Rules on the run as a whole: model source, training loop, strategy and launcher."""

from __future__ import annotations

from trainer.rules import DISTRIBUTED_STRATEGIES, error, strategy, warning
from trainer.speed import NO_FUSED_LORA_STRATEGIES

RULES = [
    error(
        "model.one_source",
        ["model"],
        lambda cfg: (cfg.model.name_or_path is None) == (cfg.model.tiny is None),
        "the model needs exactly one source: model.name_or_path or the embedded model.tiny.",
        "pick model=tiny, or a preset such as model=llama3_8b, or model=local model.name_or_path=/path.",
    ),
    error(
        "model.device_map_inference_only",
        ["model"],
        lambda cfg: cfg.model.device_map is not None and cfg.do_train,
        "model.device_map=auto splits one model over devices for inference and cannot train.",
        "set model.device_map=null and use a strategy (fsdp, zero3) to spread training over GPUs.",
    ),
    error(
        "train.length",
        ["train"],
        lambda cfg: cfg.do_train and cfg.train.max_steps <= 0 and cfg.train.num_epochs <= 0,
        "training needs a length: train.max_steps and train.num_epochs are both unset.",
        "set train.max_steps=N (steps win when set) or train.num_epochs=N.",
    ),
    error(
        "train.positive_sizes",
        ["train"],
        lambda cfg: min(cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.grad_accum,
                        cfg.train.max_seq_len, cfg.train.logging_steps, cfg.train.save_steps,
                        cfg.train.eval_steps) < 1,
        "batch sizes, grad_accum, max_seq_len and the logging/eval/save intervals must be at least 1.",
        "check the train.* values you set.",
    ),
    error(
        "train.lr",
        ["train"],
        lambda cfg: not cfg.train.lr > 0,
        "train.lr must be positive, not {cfg.train.lr}.",
        "set train.lr to a positive number such as 2e-4.",
    ),
    error(
        "data.eval_fraction",
        ["data"],
        lambda cfg: not 0 <= cfg.data.eval_fraction < 1,
        "data.eval_fraction must be in [0, 1), not {cfg.data.eval_fraction}.",
        "set data.eval_fraction=0.1, or 0 together with do_eval=false.",
    ),
    error(
        "data.eval_needs_split",
        ["data"],
        lambda cfg: cfg.do_eval and cfg.data.eval_fraction == 0,
        "do_eval=true needs a held-out split, but data.eval_fraction=0.",
        "set data.eval_fraction=0.1, or do_eval=false.",
    ),
    error(
        "run.nothing_to_do",
        [],
        lambda cfg: not cfg.do_train and not cfg.do_eval,
        "do_train=false and do_eval=false leave nothing to run.",
        "set do_train=true or do_eval=true.",
    ),
    error(
        "strategy.fsdp_version",
        ["strategy"],
        lambda cfg: strategy(cfg) == "fsdp" and cfg.strategy.version not in (1, 2),
        "strategy.version must be 1 or 2 for FSDP, not {cfg.strategy.version}.",
        "set strategy.version=2 (fully_shard) or 1.",
    ),
    error(
        "train.fused_lora_zero3",
        ["train", "strategy"],
        lambda cfg: cfg.train.fused_lora is True and strategy(cfg) in NO_FUSED_LORA_STRATEGIES,
        "train.fused_lora=true cannot run under strategy={cfg.strategy.name.value}: ZeRO-3 gathers a weight only "
        "inside its own module's call, and the fused LoRA branch reads the LoRA weights without that call.",
        "set train.fused_lora=null (peft's LoRA forward under ZeRO-3) or use strategy=fsdp.",
    ),
    warning(
        "strategy.one_process",
        ["strategy", "launcher"],
        lambda cfg: strategy(cfg) in DISTRIBUTED_STRATEGIES and cfg.launcher.name.value == "local",
        "strategy={cfg.strategy.name.value} with launcher=local runs in one process.",
        "use launcher=torchrun (or slurm) to run it on several processes.",
    ),
]
