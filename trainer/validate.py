"""Run every rule over a composed config and report all violations at once. Never imports torch."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, List, TextIO

from trainer.rules import Severity, Violation, all_rules
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


def validate(cfg: Any) -> Report:
    report = Report()
    missing = MISSING_VALUE.check(cfg)
    if missing is not None:
        # The other rules read those values; reporting them on a half-set config would only mislead.
        report.errors.append(missing)
        return report
    for rule in all_rules():
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
