"""A 2-process gloo run (torchrun, DDP) on a two-source mixture: only rank 0 tokenizes, both ranks train on the
same cached data, and a second run on the same data starts without tokenizing at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.strategy_checks import REPO
from trainer.compose import ASSETS
from trainer.data import cache


def run(tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    mixture = (f"data.sources=[{{path: {ASSETS / 'sample_instructions.jsonl'}, weight: 2}}, "
               f"{{path: {ASSETS / 'sample_conversations.jsonl'}, format: sharegpt, weight: 1}}]")
    command = [sys.executable, str(REPO / "train.py"), "launcher=torchrun", "launcher.nproc_per_node=2",
               "strategy=ddp", "quant=none", "data=mix", mixture, "train.max_steps=4", "train.save_steps=4",
               "train.eval_steps=4", "train.logging_steps=1", "train.max_seq_len=128", f"output_root={tmp_path}",
               f"run_dir={run_dir}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def ranks(run_dir: Path) -> list:
    return [json.loads((run_dir / "data" / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_share_one_tokenization_of_a_mixture(tmp_path: Path) -> None:
    first = run(tmp_path, "first")
    rank0, rank1 = ranks(first)
    assert rank0["tokenized_here"] is True and rank1["tokenized_here"] is False
    assert rank0["cache"] == rank1["cache"] and rank0["key"] == rank1["key"]
    assert rank0["train_rows"] == rank1["train_rows"] and rank0["first_rows_sha256"] == rank1["first_rows_sha256"]
    complete = [p for p in (tmp_path / ".data_cache").iterdir() if cache.is_complete(p)]
    assert [p.name for p in complete] == [rank0["key"]]
    meta = cache.read_meta(complete[0])
    assert meta["built_by"]["rank"] == 0 and [s["weight"] for s in meta["sources"]] == [2.0, 1.0]
    assert meta["train_examples"] == rank0["train_examples"]
    plan = json.loads((first / ".hydra" / "plan.json").read_text())
    assert [Path(s["path"]).name for s in plan["data"]["sources"]] == ["sample_instructions.jsonl",
                                                                      "sample_conversations.jsonl"]
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4

    second = run(tmp_path, "second")
    assert [r["tokenized_here"] for r in ranks(second)] == [False, False]
    assert {r["key"] for r in ranks(second)} == {rank0["key"]}
