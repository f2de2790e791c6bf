"""Sources: local files of every kind, save_to_disk directories and hub ids from the local cache, with columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.data.hub_cache import populate
from trainer.compose import compose
from trainer.data import IGNORE_INDEX
from trainer.data.prepare import examples
from trainer.data.spec import data_spec
from trainer.errors import UserError
from trainer.tiny import TOKENIZER_DIR

ROWS = [{"instruction": f"What is {i} plus one?", "output": f"It is {i + 1}."} for i in range(30)]
CHATS = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
         for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def answers(tok, overrides: list, root: Path) -> list:
    cfg = compose([*overrides, "do_eval=false", "data.eval_fraction=0", f"output_root={root}"])
    train, _ = examples(data_spec(cfg), tok)
    return sorted(tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]) for e in train)


def expected(rows=ROWS) -> list:
    return sorted(r["output"] + "<|im_end|>" for r in rows)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_every_local_file_type_reads_the_same_records(tok, tmp_path: Path, suffix: str) -> None:
    import datasets

    data = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"set.{suffix}"
    if suffix == "jsonl":
        data.to_json(path, lines=True)
    elif suffix == "json":
        path.write_text(json.dumps(ROWS))
    elif suffix == "parquet":
        data.to_parquet(path)
    elif suffix == "csv":
        data.to_csv(path, index=False)
    else:
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, data.data.table.schema) as writer:
            writer.write_table(data.data.table)
    spec = data_spec(compose(["data=alpaca", f"data.path={path}", f"output_root={tmp_path}"]))
    assert spec["sources"][0]["kind"] == "file"
    if suffix in ("jsonl", "parquet"):
        assert spec["sources"][0]["records"] == 30  # counted at plan time, cheaply
    assert answers(tok, ["data=alpaca", f"data.path={path}"], tmp_path) == expected()


def test_save_to_disk_directories_dataset_and_dataset_dict(tok, tmp_path: Path) -> None:
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert answers(tok, ["data=alpaca", f"data.path={single}"], tmp_path) == expected()
    many = tmp_path / "many"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:10]),
                          "test": datasets.Dataset.from_list(ROWS[10:])}).save_to_disk(str(many))
    spec = data_spec(compose(["data=alpaca", f"data.path={many}", "data.split=test", f"output_root={tmp_path}"]))
    assert spec["sources"][0]["kind"] == "saved" and spec["sources"][0]["records"] == 20
    assert answers(tok, ["data=alpaca", f"data.path={many}", "data.split=test"], tmp_path) == expected(ROWS[10:])
    with pytest.raises(UserError, match="has no split 'validation' \\(it has train, test\\)"):
        answers(tok, ["data=alpaca", f"data.path={many}", "data.split=validation"], tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match="not one written by datasets' save_to_disk"):
        answers(tok, ["data=alpaca", f"data.path={plain}"], tmp_path)


def test_hub_id_is_read_from_the_local_cache_and_a_missing_one_says_how_to_fetch_it(tok, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    populate(hf_home, "qforge-test/tiny_chats", {"train": CHATS, "test": CHATS[:4]}, monkeypatch)
    spec = data_spec(compose(["data=sharegpt", "data.path=qforge-test/tiny_chats", f"output_root={tmp_path}"]))
    source = spec["sources"][0]
    assert source["kind"] == "hub" and source["path"] == "qforge-test/tiny_chats" and source["records"] == 12
    assert "qforge-test___tiny_chats" in source["identity"]["cache_entry"]
    got = answers(tok, ["data=sharegpt", "data.path=qforge-test/tiny_chats", "data.split=test"], tmp_path)
    assert got == sorted(f"{i}!<|im_end|>" for i in range(4))

    with pytest.raises(UserError) as missing:
        answers(tok, ["data=sharegpt", "data.path=qforge-test/not_fetched"], tmp_path)
    message = str(missing.value)
    assert "hub dataset qforge-test/not_fetched is not in the local Hugging Face cache" in message
    assert "never downloads" in message
    assert "python -c \"import datasets; datasets.load_dataset('qforge-test/not_fetched', split='train')\"" in message


def test_column_mapping_reads_non_standard_field_names(tok, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"prompt": r["instruction"], "completion": r["output"]}) + "\n"
                               for r in ROWS))
    got = answers(tok, ["data=alpaca", f"data.path={renamed}", "+data.columns.instruction=prompt",
                        "+data.columns.output=completion"], tmp_path)
    assert got == expected()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"dialog": [{"speaker": "user", "text": "Hi"},
                                                     {"speaker": "assistant", "text": "Hey"}]}) + "\n"
                             for _ in range(5)))
    got = answers(tok, ["data=sharegpt", f"data.path={chats}", "+data.columns.conversations=dialog",
                        "+data.columns.role=speaker", "+data.columns.content=text"], tmp_path)
    assert got == ["Hey<|im_end|>"] * 5


def test_missing_column_is_one_sentence(tok, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    with pytest.raises(UserError, match=r"wrong.jsonl record 1 has no field 'instruction' \(its columns: "
                                        r"prompt, completion\), which the alpaca format needs; map yours with \+"
                                        r"data.columns.instruction="):
        answers(tok, ["data=alpaca", f"data.path={wrong}"], tmp_path)
    with pytest.raises(UserError, match="has no column 'question' \\(data.columns.instruction\\)"):
        answers(tok, ["data=alpaca", f"data.path={wrong}", "+data.columns.instruction=question"], tmp_path)
