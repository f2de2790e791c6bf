"""Bad input: one clear sentence, a non-zero exit, no traceback, nothing left behind that misleads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_missing_data_file(output_root: Path, data_dir: Path) -> None:
    result = run_cli("data=alpaca", f"data.path={data_dir}/nope.jsonl", f"output_root={output_root}")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "nope.jsonl does not exist" in line and "data.path" in line
    assert not list(output_root.glob("*/*")), "a run refused for bad input leaves no run dir behind"


def test_malformed_jsonl_names_file_and_line(output_root: Path, data_dir: Path) -> None:
    bad = data_dir / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    result = run_cli("data=alpaca", f"data.path={bad}", f"output_root={output_root}")
    assert result.returncode == 1
    assert f"{bad} line 2 is not valid JSON" in error_line(result.stderr)


def test_empty_dataset(output_root: Path, data_dir: Path) -> None:
    empty = data_dir / "empty.jsonl"
    empty.write_text("\n\n")
    result = run_cli("data=alpaca", f"data.path={empty}", f"output_root={output_root}")
    assert result.returncode == 1
    assert "holds no records" in error_line(result.stderr)


def test_missing_fields_for_the_format(output_root: Path, data_dir: Path) -> None:
    wrong = data_dir / "wrong.jsonl"
    wrong.write_text('{"prompt": "a", "completion": "b"}\n' * 20)
    result = run_cli("data=alpaca", f"data.path={wrong}", f"output_root={output_root}")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "record 1" in line and "'instruction'" in line and "alpaca" in line
    chats = run_cli("data=sharegpt", f"data.path={wrong}", f"output_root={output_root}")
    assert "'conversations'" in error_line(chats.stderr)


def test_model_path_that_does_not_exist(output_root: Path) -> None:
    result = run_cli("model=local", "model.name_or_path=/no/such/model", f"output_root={output_root}")
    assert result.returncode == 1
    assert "model path /no/such/model does not exist" in error_line(result.stderr)


def test_unreachable_hub_model_says_to_use_a_local_copy(output_root: Path) -> None:
    result = run_cli("model=llama3_8b", f"output_root={output_root}")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "meta-llama/Meta-Llama-3-8B" in line and "model.name_or_path" in line


def test_missing_mandatory_path_is_named(output_root: Path) -> None:
    result = run_cli("data=alpaca", f"output_root={output_root}")
    assert result.returncode != 0
    assert "data.path" in result.stderr
