"""The strategies: one object each (trainer/strategies/base.py says what a strategy owns).

Importing this package stays torch-free: the validator and the plan read the facts on a login node.
"""

from __future__ import annotations

from typing import Any, Dict, List

from trainer.rules import Rule, error, strategy, warning
from trainer.strategies import ddp, deepspeed, fsdp, single
from trainer.strategies.base import Strategy, StrategySpec

ALL: List[Strategy] = [single.STRATEGY, ddp.STRATEGY, fsdp.STRATEGY, *deepspeed.STRATEGIES]
_BY_NAME: Dict[str, Strategy] = {s.name: s for s in ALL}


def strategy_for(name: str) -> Strategy:
    return _BY_NAME[name]


def chosen(cfg: Any) -> Strategy:
    return _BY_NAME[strategy(cfg)]


def shards_weights(cfg: Any) -> bool:
    return chosen(cfg).shards_weights


RULES: List[Rule] = [
    error(
        "train.fused_lora_zero3",
        ["train", "strategy"],
        lambda cfg: cfg.train.fused_lora is True and not chosen(cfg).allows_fused_lora,
        "train.fused_lora=true cannot run under strategy={cfg.strategy.name.value}: ZeRO-3 gathers a weight only "
        "inside its own module's call, and the fused LoRA branch reads the LoRA weights without that call.",
        "set train.fused_lora=null (peft's LoRA forward under ZeRO-3) or use strategy=fsdp.",
    ),
    error(
        "train.compile_strategy",
        ["train", "strategy"],
        lambda cfg: cfg.train.compile and not chosen(cfg).allows_compile,
        "train.compile=true is built for strategy=single and ddp; under strategy={cfg.strategy.name.value} the "
        "per-layer gather and free hooks of the sharded weights sit around the compiled layers, which is untested.",
        "set train.compile=false, or use strategy=ddp (or single).",
    ),
    error(
        "eval.samples_sharded",
        ["eval", "strategy"],
        lambda cfg: cfg.eval.samples > 0 and chosen(cfg).shards_weights,
        "eval.samples generates on one rank with the whole model, which strategy={cfg.strategy.name.value} never "
        "holds in one place.",
        "use strategy=ddp (or single) for runs with samples, or export the run (python -m trainer.export) and "
        "generate from the merged model.",
    ),
    warning(
        "strategy.one_process",
        ["strategy", "launcher"],
        lambda cfg: chosen(cfg).distributed and cfg.launcher.name.value == "local",
        "strategy={cfg.strategy.name.value} with launcher=local runs in one process.",
        "use launcher=torchrun (or slurm) to run it on several processes.",
    ),
    *(rule for s in ALL for rule in s.rules),
]

__all__ = ["ALL", "RULES", "Strategy", "StrategySpec", "chosen", "shards_weights", "strategy_for"]
