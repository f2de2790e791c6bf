"""Looking before training (python -m trainer.data preview) and bad data input through the CLI: one sentence each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, run_cli
from tests.test_bad_input import error_line


def preview(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.data", "preview", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_preview_marks_trained_spans_counts_tokens_and_draws_lengths(tmp_path: Path) -> None:
    shown = preview("-n", "2", "--records", "100", f"output_root={tmp_path}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    out = shown.stdout
    assert "template: auto (the tokenizer's chat_template); trained spans from generation markers; end of turn: " \
           "<|im_end|>" in out
    assert "sample_instructions.jsonl (file, alpaca, split train): weight 1, 480 records, planned 432 train" in out
    assert out.count("--- ") == 2 and "record 1: 37 tokens, 6 trained ---" in out
    assert "<|im_start|>assistant\n[[It appears two times.<|im_end|>]]" in out
    assert "token lengths of 100 records: min " in out and "#" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing tokenized, nothing cached


def test_preview_of_a_mixture_with_a_bad_template_is_refused_by_the_rule(tmp_path: Path) -> None:
    refused = preview("data.template=nosuch", f"output_root={tmp_path}")
    assert refused.returncode == 2 and "[data.template]" in refused.stderr


def test_bad_chat_records_are_one_sentence_and_a_non_zero_exit(tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
                     + "\n" + json.dumps({"conversations": [{"from": "human", "value": "alone"}]}) + "\n")
    result = run_cli("data=sharegpt", f"data.path={chats}", "do_eval=false", "data.eval_fraction=0",
                     f"output_root={tmp_path / 'out'}")
    assert result.returncode == 1
    assert f"{chats} record 2 has no assistant turn to learn from" in error_line(result.stderr)

    strict = tmp_path / "strict.jinja"
    strict.write_text("{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('system turns "
                      "are not supported') }}{%- endif %}{{ m['content'] }}{%- endfor %}")
    with_system = tmp_path / "system.jsonl"
    with_system.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user",
                                                    "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    result = run_cli("data=sharegpt", f"data.path={with_system}", f"data.template={strict}", "do_eval=false",
                     "data.eval_fraction=0", f"output_root={tmp_path / 'out'}")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "system.jsonl record 1: template file" in line and "system turns are not supported" in line

    weights = run_cli("data=mix", f"data.sources=[{{path: {chats}, weight: 0}}]", f"output_root={tmp_path / 'out'}")
    assert weights.returncode == 2 and "[data.weights]" in weights.stderr and "Traceback" not in weights.stderr
