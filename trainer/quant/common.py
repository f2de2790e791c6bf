"""Rule builders that several backends share, so each backend states its facts in one line each."""

from __future__ import annotations

from trainer.rules import Rule, error, method
from trainer.strategies import shards_weights


def no_sharding_rule(backend: str, label: str, why: str) -> Rule:
    return error(
        f"{backend}.no_sharded_strategy",
        ["quant", "strategy"],
        lambda cfg: method(cfg) == backend and shards_weights(cfg),
        f"{label} cannot be used with strategy={{cfg.strategy.name.value}}: {why}",
        "use strategy=ddp (or single/zero2), or quant=bnb4, which FSDP and ZeRO-3 can shard.",
    )
