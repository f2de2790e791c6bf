"""Rule builders that several backends share, so each backend states its facts in one line each."""

from __future__ import annotations

from typing import Any, Iterable

from trainer.rules import Rule, error, method, shards_weights, strategy


def bits_rule(backend: str, allowed: Iterable[int], label: str) -> Rule:
    allowed = tuple(allowed)
    listed = "/".join(str(b) for b in allowed)
    return error(
        f"{backend}.bits",
        ["quant"],
        lambda cfg: method(cfg) == backend and cfg.quant.bits not in allowed,
        f"{label} quantizes to {listed} bits, not quant.bits={{cfg.quant.bits}}.",
        f"set quant.bits to one of {listed}.",
    )


def no_sharding_rule(backend: str, label: str, why: str) -> Rule:
    return error(
        f"{backend}.no_sharded_strategy",
        ["quant", "strategy"],
        lambda cfg: method(cfg) == backend and shards_weights(cfg),
        f"{label} cannot be used with strategy={{cfg.strategy.name.value}}: {why}",
        "use strategy=ddp (or single/zero2), or quant=bnb4, which FSDP and ZeRO-3 can shard.",
    )


def is_method(name: str) -> Any:
    return lambda cfg: method(cfg) == name


__all__ = ["bits_rule", "no_sharding_rule", "is_method", "strategy"]
