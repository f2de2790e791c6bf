"""Rules are data: one rule, one place, one message, one fix.

A rule names the config groups it concerns and holds a predicate over the composed config that is
true when the composition is wrong. Its message and fix are format strings over the config (`{cfg}`),
so the sentence a user reads names their actual values. Rules live beside the thing they protect
(a backend's rules in its module); trainer/validate.py gathers them. This module knows nothing of the
project: everything imports it, it imports nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Dict, Iterable, Optional


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
    # More fields for the message and fix beyond {cfg} (e.g. which keys), computed only when violated.
    details: Optional[Callable[[Any], Dict[str, Any]]] = None

    def check(self, cfg: Any) -> Violation | None:
        if not self.violated(cfg):
            return None
        extra = self.details(cfg) if self.details else {}
        return Violation(
            rule_id=self.id,
            severity=self.severity,
            message=self.message.format(cfg=cfg, **extra),
            fix=self.fix.format(cfg=cfg, **extra),
        )


@dataclass(frozen=True)
class Violation:
    rule_id: str
    severity: Severity
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.severity.value}: [{self.rule_id}] {self.message} Fix: {self.fix}"


def error(id: str, groups: Iterable[str], violated: Callable[[Any], bool], message: str, fix: str,
          details: Optional[Callable[[Any], Dict[str, Any]]] = None) -> Rule:
    return Rule(id, tuple(groups), violated, message, fix, Severity.error, details)


def warning(id: str, groups: Iterable[str], violated: Callable[[Any], bool], message: str, fix: str,
            details: Optional[Callable[[Any], Dict[str, Any]]] = None) -> Rule:
    return Rule(id, tuple(groups), violated, message, fix, Severity.warning, details)


# Facts about a composed config that many rules share; plain functions so predicates stay one line.


def method(cfg: Any) -> str:
    return _value(cfg.quant.method)


def strategy(cfg: Any) -> str:
    return _value(cfg.strategy.name)


def peft_method(cfg: Any) -> str:
    return _value(cfg.peft.method)


def _value(x: Any) -> str:
    return x.value if isinstance(x, Enum) else str(x)
