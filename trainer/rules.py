"""Rules are data: one rule, one place, one message, one fix.

A rule names the config groups it concerns and holds a predicate over the composed config that is
true when the composition is wrong. Its message and fix are format strings over the config (`{cfg}`),
so the sentence a user reads names their actual values. Rules live beside the thing they protect
(a backend's rules in its module); `all_rules()` gathers them for the validator and the matrix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, List


class Severity(str, Enum):
    error = "error"
    warning = "warning"


@dataclass(frozen=True)
class Rule:
    id: str
    groups: tuple[str, ...]
    violated: Callable[[Any], bool]
    message: str
    fix: str
    severity: Severity = Severity.error

    def check(self, cfg: Any) -> Violation | None:
        if not self.violated(cfg):
            return None
        return Violation(
            rule_id=self.id,
            severity=self.severity,
            message=self.message.format(cfg=cfg),
            fix=self.fix.format(cfg=cfg),
        )


@dataclass(frozen=True)
class Violation:
    rule_id: str
    severity: Severity
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.severity.value}: [{self.rule_id}] {self.message} Fix: {self.fix}"


def error(id: str, groups: Iterable[str], violated: Callable[[Any], bool], message: str, fix: str) -> Rule:
    return Rule(id, tuple(groups), violated, message, fix, Severity.error)


def warning(id: str, groups: Iterable[str], violated: Callable[[Any], bool], message: str, fix: str) -> Rule:
    return Rule(id, tuple(groups), violated, message, fix, Severity.warning)


# Facts about a composed config that many rules share; plain functions so predicates stay one line.

SHARDED_STRATEGIES = ("fsdp", "zero3", "zero3_offload")
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "zero2", "zero3", "zero3_offload")


def method(cfg: Any) -> str:
    return _value(cfg.quant.method)


def strategy(cfg: Any) -> str:
    return _value(cfg.strategy.name)


def peft_method(cfg: Any) -> str:
    return _value(cfg.peft.method)


def shards_weights(cfg: Any) -> bool:
    return strategy(cfg) in SHARDED_STRATEGIES


def _value(x: Any) -> str:
    return x.value if isinstance(x, Enum) else str(x)


@functools.lru_cache(maxsize=1)
def all_rules() -> List[Rule]:
    """Every rule of the project, gathered from the modules that own them."""
    from trainer import adapters_rules, run_rules, strategies
    from trainer.data import rules as data_rules
    from trainer.quant import backends

    rules: List[Rule] = []
    rules += run_rules.RULES
    rules += data_rules.RULES
    rules += adapters_rules.RULES
    rules += strategies.RULES
    for backend in backends():
        rules += backend.rules
    ids = [r.id for r in rules]
    duplicated = {i for i in ids if ids.count(i) > 1}
    assert not duplicated, f"rule ids must be unique: {sorted(duplicated)}"
    return rules
