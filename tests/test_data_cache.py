"""Tokenize once: one cache entry per key, built by rank 0 atomically, found again without tokenizing."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer.compose import compose
from trainer.data import cache
from trainer.data.prepare import prepare, training_data
from trainer.data.spec import data_spec
from trainer.errors import UserError
from trainer.tiny import TOKENIZER_DIR


@pytest.fixture
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def spec_for(root: Path, *overrides: str) -> dict:
    return data_spec(compose([*overrides, f"output_root={root}"]))


def entries(root: Path) -> list:
    return sorted(p.name for p in (root / ".data_cache").iterdir() if cache.is_complete(p))


def test_second_start_maps_the_cache_without_tokenizing(tmp_path: Path, tok) -> None:
    spec = spec_for(tmp_path)
    first = prepare(spec, tok)
    assert first.built_here and first.meta["built_by"]["rank"] == 0
    assert first.meta["train_examples"] == len(first.train_index) == 432
    started = time.monotonic()
    second = prepare(spec_for(tmp_path), tok)
    assert not second.built_here and second.path == first.path and time.monotonic() - started < 5
    assert entries(tmp_path) == [first.path.name]
    train, evals, _ = training_data(spec, tok)
    assert len(evals) > 0 and sum(len(train.members(i)) for i in range(len(train))) == 432


@pytest.mark.parametrize("change", ["train.max_seq_len=256", "data.template=chatml", "train.packing=false",
                                    "data.eval_fraction=0.2", "data.max_samples=100", "tokenizer", "file"])
def test_the_key_changes_with_what_changes_the_tokens(tmp_path: Path, tok, change: str) -> None:
    data = tmp_path / "set.jsonl"
    data.write_text((Path(TOKENIZER_DIR).parent / "sample_instructions.jsonl").read_text())
    base = ("data=alpaca", f"data.path={data}")
    first = prepare(spec_for(tmp_path, *base), tok).path
    if change == "tokenizer":
        tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
        again = prepare(spec_for(tmp_path, *base), tok).path
    elif change == "file":
        os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
        again = prepare(spec_for(tmp_path, *base), tok).path
    else:
        again = prepare(spec_for(tmp_path, *base, change), tok).path
    assert again != first
    assert prepare(spec_for(tmp_path, *base, *([change] if "=" in change else [])), tok).path == again


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, tok) -> None:
    data = tmp_path / "set.jsonl"
    good = {"instruction": "a", "output": "b"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "a", "output": None}) + "\n")
    spec = spec_for(tmp_path, "data=alpaca", f"data.path={data}", "do_eval=false", "data.eval_fraction=0")
    with pytest.raises(UserError, match="set.jsonl record 2 has no text field 'output'"):
        prepare(spec, tok)
    assert entries(tmp_path) == [] and not list((tmp_path / ".data_cache").glob(".building-*"))
    # A scratch dir left by a killed build is never taken for a complete entry.
    data.write_text(json.dumps(good) + "\n")
    spec = spec_for(tmp_path, "data=alpaca", f"data.path={data}", "do_eval=false", "data.eval_fraction=0")
    from trainer.data import templates

    key = cache.cache_key(spec, tok, templates.resolve(spec["template"], tok, False).text)
    half = tmp_path / ".data_cache" / key
    half.mkdir()
    (half / "tokens-0.arrow").write_bytes(b"half")
    assert not cache.is_complete(half)
    rebuilt = prepare(spec, tok)
    assert rebuilt.built_here and rebuilt.path == half and cache.is_complete(half)
    assert not (half / "tokens-0.arrow").read_bytes() == b"half"


def test_other_ranks_wait_for_rank_0_and_share_its_failure(tmp_path: Path, monkeypatch) -> None:
    spec = {"cache_dir": str(tmp_path)}
    built = []

    def slow_build(scratch: Path) -> dict:
        time.sleep(1.0)
        (scratch / "payload").write_text("x")
        built.append(threading.current_thread().name)
        return {}

    rank0 = threading.Thread(target=cache.build_once, args=(spec, "k1", slow_build, 0, 2), name="rank0")
    rank0.start()
    path = cache.build_once(spec, "k1", lambda s: pytest.fail("rank 1 must not build"), 1, 2)
    rank0.join()
    assert built == ["rank0"] and (path / "payload").read_text() == "x"

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")

    def failing_build(scratch: Path) -> dict:
        time.sleep(0.5)
        raise UserError("bad record 7")

    failing = threading.Thread(target=lambda: pytest.raises(UserError, cache.build_once, spec, "k2",
                                                            failing_build, 0, 2))
    failing.start()
    with pytest.raises(UserError, match="bad record 7"):
        cache.build_once(spec, "k2", lambda s: {}, 1, 2)
    failing.join()


def test_a_rank_that_never_sees_rank_0_work_stops_with_the_cause(tmp_path: Path, monkeypatch) -> None:
    """Rank 0 on another node writing a cache dir this node does not see: a clear error, not a wait forever; a
    rank that has seen rank 0's scratch dir keeps waiting however long tokenizing takes."""
    monkeypatch.setattr(cache, "VISIBLE_WITHIN_SECONDS", 1.0)
    spec = {"cache_dir": str(tmp_path / "not-shared")}
    started = time.monotonic()
    with pytest.raises(UserError, match="data.cache_dir to a path on a filesystem every node sees"):
        cache.build_once(spec, "k3", lambda s: pytest.fail("rank 1 must not build"), 1, 2)
    assert time.monotonic() - started < 30

    def slow_build(scratch: Path) -> dict:
        time.sleep(2.5)  # longer than the visibility limit: rank 1 saw the scratch dir, so it waits
        (scratch / "payload").write_text("y")
        return {}

    shared = {"cache_dir": str(tmp_path / "shared")}
    rank0 = threading.Thread(target=cache.build_once, args=(shared, "k4", slow_build, 0, 2))
    rank0.start()
    time.sleep(0.3)  # rank 0 has made its scratch dir
    path = cache.build_once(shared, "k4", lambda s: pytest.fail("rank 1 must not build"), 1, 2)
    rank0.join()
    assert (path / "payload").read_text() == "y"


def test_worker_processes_tokenize_exactly_what_one_process_does(tmp_path: Path, tok) -> None:
    one = prepare(spec_for(tmp_path / "one"), tok)
    two = prepare(spec_for(tmp_path / "two", "data.num_proc=2"), tok)
    assert two.meta["num_proc"] == 2 and len(two.meta["shards"]) == 2
    assert one.table[:]["input_ids"] == two.table[:]["input_ids"] and one.table[:]["labels"] == two.table[:]["labels"]
    assert list(one.train_index) == list(two.train_index)
