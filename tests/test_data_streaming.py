"""data.streaming=true: train from an iterable dataset (tokenized on the fly, packed in windows), and a killed
run resumes from the right sample: after the resume point its losses are the uninterrupted run's, step by step."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.strategy_checks import REPO, kill_tree
from trainer import checkpoints
from trainer.compose import compose
from trainer.data.prepare import training_data
from trainer.data.spec import data_spec
from trainer.tiny import TOKENIZER_DIR

STEPS = 8


def test_the_stream_is_deterministic_packed_and_interleaved_by_weight(tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": f"chat {i}"}]}) + "\n"
                             for i in range(50)))
    mixture = (f"data.sources=[{{path: {REPO / 'trainer/assets/sample_instructions.jsonl'}, weight: 3}}, "
               f"{{path: {chats}, format: sharegpt, weight: 1}}]")
    cfg = compose(["data=mix", mixture, "data.streaming=true", "do_eval=false", "train.max_steps=5",
                   "train.max_seq_len=256", f"output_root={tmp_path}"])
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    stream, evals, collator = training_data(data_spec(cfg), tok)
    assert evals is None and not hasattr(stream, "__len__")
    rows = [row for row, _ in zip(stream, range(12))]
    assert rows == [row for row, _ in zip(stream, range(12))]  # the same order every time it is iterated
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    assert any(p == 0 for p in rows[0]["position_ids"][1:])  # several examples share a row
    assert collator(rows[:2])["input_ids"].shape[0] == 2
    assert not (tmp_path / ".data_cache").exists() or not any(
        p.name != "raw" for p in (tmp_path / ".data_cache").iterdir())  # nothing tokenized is cached


def command(run_dir: Path, save_steps: int, ranks: int = 1) -> list:
    ranks_args = [] if ranks == 1 else ["launcher=torchrun", f"launcher.nproc_per_node={ranks}", "strategy=ddp",
                                        "train.callbacks=[tests.probes:first_batch]"]
    return [sys.executable, str(REPO / "train.py"), "quant=none", "data.streaming=true", "do_eval=false",
            f"train.max_steps={STEPS}", f"train.save_steps={save_steps}", "train.logging_steps=1",
            "train.max_seq_len=128", "train.batch_size=2", f"output_root={run_dir.parent}", f"run_dir={run_dir}",
            *ranks_args]


def losses(run_dir: Path) -> dict:
    history = json.loads((run_dir / "metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "ddp-2-ranks"])
def test_a_killed_streaming_run_resumes_from_the_right_sample(tmp_path: Path, ranks: int) -> None:
    """With 2 DDP ranks each rank reads the stream and keeps its own share of the rows (trainer/plan.py)."""
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference, STEPS, ranks), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if ranks > 1:
        firsts = [json.loads((reference / f"first_batch-{r}.json").read_text()) for r in range(ranks)]
        assert firsts[0]["shape"][0] == 2 and firsts[0]["sha256"] != firsts[1]["sha256"], firsts  # its own rows

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, 1, ranks), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "checkpoint-2" / checkpoints.COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-2 before the run ended"
        time.sleep(0.1)
    kill_tree(proc)
    assert not (killed / "metrics.json").exists(), "the run finished before the kill landed"
    resumed_from = max(checkpoints.step_of(p) for p in (killed / "checkpoints").glob("checkpoint-*")
                       if (p / checkpoints.COMPLETE_MARKER).exists())
    assert resumed_from < STEPS

    again = subprocess.run(command(killed, 1, ranks), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == resumed_from and metrics["steps"] == STEPS
    want, got = losses(reference), losses(killed)
    for step in range(resumed_from + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)
