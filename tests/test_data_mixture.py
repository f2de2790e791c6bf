"""Weighted mixtures: deterministic by seed, shares follow the weights, eval never overlaps training; the rules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from tests.conftest import run_cli
from trainer.compose import compose
from trainer.data import IGNORE_INDEX
from trainer.data.mixture import planned_counts, train_counts
from trainer.data.prepare import examples
from trainer.data.spec import data_spec
from trainer.tiny import TOKENIZER_DIR
from trainer.validate import validate


def write(path: Path, tag: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"{tag} question {i}", "output": f"{tag} {i}"}) + "\n"
                            for i in range(n)))
    return path


def sources_override(*entries: dict) -> str:
    inner = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}" for e in entries)
    return f"data.sources=[{inner}]"


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple:
    return write(tmp_path / "big.jsonl", "big", 90), write(tmp_path / "small.jsonl", "small", 10)


def mixture(tmp_path: Path, *extra: str) -> list:
    return ["data=mix", f"output_root={tmp_path}", *extra]


def sources_of(tok, items) -> Counter:
    return Counter(tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]).split()[0]
                   for e in items)


def test_shares_follow_weights_and_small_sources_repeat(tmp_path: Path, two_sources: tuple) -> None:
    big, small = two_sources
    cfg = compose(mixture(tmp_path, sources_override({"path": big, "weight": 1}, {"path": small, "weight": 1}),
                          "data.eval_fraction=0.1"))
    spec = data_spec(cfg)
    assert [s["weight"] for s in spec["sources"]] == [1.0, 1.0]
    assert spec["planned_examples"] == {"train": 90, "eval": 10}  # 81 + 9 train records, 9 + 1 held out
    assert [(s["planned_train_examples"], s["planned_eval_examples"]) for s in spec["sources"]] == [(45, 9), (45, 1)]
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train, evals = examples(spec, tok)
    assert sources_of(tok, train) == {"big": 45, "small": 45}  # the small source's 9 records, 5 times each
    assert sources_of(tok, evals) == {"big": 9, "small": 1}
    held_out = {tuple(e.input_ids) for e in evals}
    assert not held_out & {tuple(e.input_ids) for e in train}  # repeated or not, eval never trains

    again, _ = examples(data_spec(cfg), tok)
    assert [e.input_ids for e in again] == [e.input_ids for e in train]  # deterministic by seed
    reseeded, _ = examples(data_spec(compose([*mixture(tmp_path, sources_override(
        {"path": big, "weight": 1}, {"path": small, "weight": 1}), "data.eval_fraction=0.1"), "data.split_seed=7"])),
        tok)
    assert sorted(e.input_ids for e in reseeded) != sorted(e.input_ids for e in train)


def test_max_samples_split_and_format_per_source(tmp_path: Path, two_sources: tuple) -> None:
    big, _ = two_sources
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": f"chat {i}"}]}) + "\n"
                             for i in range(20)))
    cfg = compose(mixture(tmp_path, sources_override({"path": big, "weight": 3, "max_samples": 30},
                                                     {"path": chats, "weight": 1, "format": "sharegpt"}),
                          "do_eval=false"))
    spec = data_spec(cfg)
    assert [s["format"] for s in spec["sources"]] == ["alpaca", "sharegpt"]
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train, evals = examples(spec, tok)
    assert sources_of(tok, train) == {"big": 38, "chat": 12} and not evals  # 50 examples at 3:1


def test_train_counts_add_up() -> None:
    assert train_counts([10, 20, 30], [1, 1, 1]) == [20, 20, 20]
    assert sum(train_counts([7, 3], [2, 1])) == 10
    assert train_counts([5], [0.3]) == [5]
    assert planned_counts([100, None], [1, 1], 0.1) is None


@pytest.mark.parametrize("overrides, rule", [
    (["data=mix", "data.sources=[]"], "data.empty_mixture"),
    (["data=mix", "data.sources=[{path: a.jsonl, weight: 0}, {path: b.jsonl, weight: 0}]"], "data.weights"),
    (["data=mix", "data.sources=[{path: a.jsonl, weight: -1}, {path: b.jsonl, weight: 2}]"], "data.weights"),
    (["data=mix", "data.sources=[{path: a.jsonl}]", "data.path=b.jsonl"], "data.one_source"),
    (["data.template=nosuch"], "data.template"),
    (["+data.columns.answer=x"], "data.columns"),
    (["data.num_proc=0"], "data.num_proc"),
    (["data.streaming=true", "do_eval=false"], "data.streaming_needs_max_steps"),
    (["data.streaming=true", "train.max_steps=5"], "data.streaming_eval"),
])
def test_config_level_data_rules(overrides: list, rule: str) -> None:
    assert rule in {v.rule_id for v in validate(compose(overrides)).errors}


def test_chat_data_on_a_base_tokenizer_is_refused_with_the_fix(tmp_path: Path) -> None:
    base = tmp_path / "base-model"
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = None
    tok.save_pretrained(base)
    (base / "config.json").write_text("{}")
    cfg = compose(["model=local", f"model.name_or_path={base}", "data=sharegpt", "data.path=x.jsonl"])
    violation = next(v for v in validate(cfg).errors if v.rule_id == "data.chat_needs_template")
    assert "data.template=chatml" in violation.fix
    named = compose(["model=local", f"model.name_or_path={base}", "data=sharegpt", "data.path=x.jsonl",
                     "data.template=chatml"])
    assert "data.chat_needs_template" not in {v.rule_id for v in validate(named).errors}


def test_a_mixture_in_a_yaml_file_of_your_own_dry_runs_with_weights_and_counts(tmp_path: Path,
                                                                              two_sources: tuple) -> None:
    big, small = two_sources
    confs = tmp_path / "confs" / "data"
    confs.mkdir(parents=True)
    (confs / "mymix.yaml").write_text(yaml.safe_dump({
        "path": None, "eval_fraction": 0.1,
        "sources": [{"path": str(big), "weight": 2}, {"path": str(small), "weight": 1, "max_samples": 5}]}))
    shown = run_cli("--config-dir", str(tmp_path / "confs"), "data=mymix", "dry_run=true",
                    f"output_root={tmp_path / 'out'}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    plan = yaml.safe_load(shown.stdout)["data"]
    assert plan["template"] == {"name": "auto"}
    assert [(s["path"], s["weight"], s["records"]) for s in plan["sources"]] == [(str(big), 2.0, 90),
                                                                                 (str(small), 1.0, 10)]
    assert [s["planned_train_examples"] for s in plan["sources"]] == [57, 29]  # 81 + 5 train records at 2:1
    assert plan["planned_examples"] == {"train": 86, "eval": 9} and len(plan["fingerprint"]) == 16
    assert plan["cache_dir"] == str(tmp_path / "out" / ".data_cache")
    assert not (tmp_path / "out").exists()  # a dry run creates nothing

    refused = run_cli("data=mix", "data.sources=[]", "dry_run=true")
    assert refused.returncode == 2 and "[data.empty_mixture]" in refused.stderr
