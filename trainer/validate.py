"""Run every rule over a composed config and report all violations at once. Never imports torch.

The rules live beside what they protect; this gathers them from their owners: the run as a whole
(run_rules), the data layer (trainer/data/rules.py), adapters on quantized weights (adapters_rules),
launchers (launcher_rules), the strategies, the quant backends and the memory model (trainer/memory/rules.py).
Nothing here is imported back by them.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, List, TextIO

from trainer import adapters_rules, launcher_rules, run_rules, strategies
from trainer.data import rules as data_rules
from trainer.memory import rules as memory_rules
from trainer.quant import backends
from trainer.rules import Rule, Severity, Violation
from trainer.run_rules import MISSING_VALUE


@dataclass
class Report:
    errors: List[Violation] = field(default_factory=list)
    warnings: List[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def print(self, stream: TextIO = sys.stderr) -> None:
        for violation in self.warnings + self.errors:
            print(violation.line(), file=stream)

    def summary(self) -> str:
        """The errors as one paragraph, for tools that report a refusal in one sentence (export)."""
        return " ".join(v.line().removeprefix("error: ") for v in self.errors)


@functools.lru_cache(maxsize=1)
def all_rules() -> List[Rule]:
    """Every rule of `python train.py`, gathered from the modules that own them."""
    rules: List[Rule] = [*run_rules.RULES, *data_rules.RULES, *adapters_rules.RULES, *launcher_rules.RULES,
                         *strategies.RULES, *memory_rules.RULES]
    for backend in backends():
        rules += backend.all_rules()
    ids = [r.id for r in rules]
    duplicated = {i for i in ids if ids.count(i) > 1}
    assert not duplicated, f"rule ids must be unique: {sorted(duplicated)}"
    return rules


def validate(cfg: Any, rules: Iterable[Rule] = ()) -> Report:
    """Every rule (or the given ones) over `cfg`; a value left unset is reported alone, first."""
    report = Report()
    missing = MISSING_VALUE.check(cfg)
    if missing is not None:
        # The other rules read those values; reporting them on a half-set config would only mislead.
        report.errors.append(missing)
        return report
    for rule in list(rules) or all_rules():
        if rule is MISSING_VALUE:
            continue
        violation = rule.check(cfg)
        if violation is None:
            continue
        if violation.severity is Severity.error:
            report.errors.append(violation)
        else:
            report.warnings.append(violation)
    return report
