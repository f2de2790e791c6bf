"""docs/compatibility.md is generated from the rules and must not drift from them."""

from __future__ import annotations

from tests.conftest import REPO
from trainer.compose import compose
from trainer.matrix import cells, render
from trainer.validate import validate


def test_docs_matrix_is_current() -> None:
    committed = (REPO / "docs" / "compatibility.md").read_text()
    assert committed == render(), "docs/compatibility.md is stale: run python -m trainer.matrix > docs/compatibility.md"


def test_matrix_cells_agree_with_full_composition() -> None:
    table = cells()
    for quant, strategy, peft in [("bnb8", "fsdp", "lora"), ("bnb4", "zero3", "lora"), ("hqq", "ddp", "full"),
                                  ("fp8", "fsdp", "full")]:
        report = validate(compose([f"quant={quant}", f"strategy={strategy}", f"peft={peft}", "launcher=torchrun"]))
        expected = "no" if report.errors else "ok-or-warn"
        assert table[(quant, strategy, peft)].startswith("no") == (expected == "no")
