"""Bad input, as a demanding user types it: one sentence naming what is wrong and the fix, a non-zero exit, no
traceback, nothing created that looks like a run, and nothing of an earlier run touched (hashed before/after).

One table row per case; the fixtures build what the cases point at (a damaged tokenizer, an interrupted run,
a checkpoint from another output root) once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tests.conftest import run_cli


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def tree_hashes(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class World:
    """What the cases point at, built once."""

    root: Path
    interrupted: Path  # a run with checkpoints and no metrics.json, as a crash leaves it
    foreign: Path  # a complete checkpoint written under another output root
    tampered: Path  # a copy of a checkpoint of this output root with one file changed
    unsigned: Path  # a checkpoint whose marker has no manifest (a hand-made or old one)
    files: Dict[str, Path] = field(default_factory=dict)


SHORT = ["quant=none", "train.max_steps=4", "train.save_steps=2", "do_eval=false", "data.eval_fraction=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    outputs = root / "outputs"
    interrupted = outputs / "interrupted"
    made = run_cli(*SHORT, f"output_root={outputs}", f"run_dir={interrupted}")
    assert made.returncode == 0, made.stderr[-3000:]
    (interrupted / "metrics.json").unlink()  # killed after its last checkpoint, before its outputs
    other = root / "elsewhere"
    foreign_run = other / "run"
    made = run_cli(*SHORT, f"output_root={other}", f"run_dir={foreign_run}")
    assert made.returncode == 0, made.stderr[-3000:]
    foreign = foreign_run / "checkpoints" / "checkpoint-4"

    tampered = outputs / "tampered" / "checkpoints" / "checkpoint-2"
    shutil.copytree(interrupted / "checkpoints" / "checkpoint-2", tampered)
    (tampered / "trainer_state.json").write_text((tampered / "trainer_state.json").read_text() + " ")
    unsigned = outputs / "unsigned" / "checkpoints" / "checkpoint-2"
    shutil.copytree(interrupted / "checkpoints" / "checkpoint-2", unsigned)
    (unsigned / "qforge_complete.json").write_text(json.dumps({"step": 2}))

    files = {}
    data = root / "data"
    data.mkdir()
    files["latin1"] = data / "latin1.jsonl"
    files["latin1"].write_bytes('{"instruction": "café", "output": "oui"}\n'.encode("latin-1") * 20)
    files["malformed"] = data / "bad.jsonl"
    files["malformed"].write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    files["empty"] = data / "empty.jsonl"
    files["empty"].write_text("\n\n")
    files["wrong_fields"] = data / "wrong.jsonl"
    files["wrong_fields"].write_text('{"prompt": "a", "completion": "b"}\n' * 20)
    files["a_file"] = data / "not-a-dir"
    files["a_file"].write_text("x")
    files["data_dir"] = data
    from trainer.compose import compose
    from trainer.tiny import ensure_tiny_model

    tiny = ensure_tiny_model(compose([]).model.tiny)
    for name, damage in (("empty_tokenizer", "empty"), ("no_tokenizer", "missing")):
        model = root / name
        shutil.copytree(tiny, model)
        if damage == "empty":
            (model / "tokenizer.json").write_text("")
        else:
            (model / "tokenizer.json").unlink()
        files[name] = model
    return World(root, interrupted, foreign, tampered, unsigned, files)


@dataclass
class Case:
    id: str
    args: Callable[[World], List[str]]
    says: List[str]  # fragments the one error line must hold
    exit_code: int = 1
    env: Optional[Dict[str, str]] = None
    needs: Optional[Callable[[], Optional[str]]] = None  # a reason to skip, or None


def _no_sbatch() -> Optional[str]:
    return None if shutil.which("sbatch") else "sbatch is not installed here (tests/slurm/cluster.sh install)"


CASES = [
    # --- files a run reads ---
    Case("malformed-jsonl", lambda w: ["data=alpaca", f"data.path={w.files['malformed']}"],
         ["bad.jsonl line 2 is not valid JSON"]),
    Case("empty-dataset", lambda w: ["data=alpaca", f"data.path={w.files['empty']}"], ["holds no records"]),
    Case("alpaca-fields-missing", lambda w: ["data=alpaca", f"data.path={w.files['wrong_fields']}"],
         ["record 1", "'instruction'", "alpaca"]),
    Case("sharegpt-fields-missing", lambda w: ["data=sharegpt", f"data.path={w.files['wrong_fields']}"],
         ["'conversations'"]),
    Case("model-path-missing", lambda w: ["model=local", "model.name_or_path=/no/such/model"],
         ["model path /no/such/model does not exist"]),
    Case("hub-model-not-cached", lambda w: ["model=llama3_8b"], ["meta-llama/Meta-Llama-3-8B", "model.name_or_path"]),
    # --- tracebacks before ---
    Case("non-utf8-data", lambda w: ["data=alpaca", f"data.path={w.files['latin1']}"],
         ["is not UTF-8 text", "iconv"]),
    Case("tokenizer-files-empty", lambda w: ["model=local", f"model.name_or_path={w.files['empty_tokenizer']}"],
         ["tokenizer files", "are empty", "copy them again"]),
    Case("tokenizer-files-missing", lambda w: ["model=local", f"model.name_or_path={w.files['no_tokenizer']}"],
         ["holds no tokenizer", "copy the tokenizer files"]),
    Case("adapter-missing", lambda w: ["model.adapters=[/nonexistent/adapter]"],
         ["model.adapters lists /nonexistent/adapter", "not a directory"]),
    Case("lora-rank-zero", lambda w: ["peft.r=0"], ["[range.peft.r]", "peft.r must be at least 1, not 0"], 2),
    Case("unknown-target-module", lambda w: ["peft.target_modules=[nosuch]"],
         ["[peft.target_modules]", "nosuch", "q_proj"], 2),
    Case("unknown-optimizer", lambda w: ["train.optim=bogus"], ["train.optim=bogus is not one of", "adamw_torch"], 2),
    Case("run-dir-is-a-file", lambda w: [f"run_dir={w.files['a_file']}"], ["is a file, not a directory"]),
    Case("output-root-under-a-file", lambda w: [f"output_root={w.files['a_file']}/outputs"],
         ["is a file", "output_root"]),
    Case("data-path-unset", lambda w: ["data=alpaca"], ["[config.missing_value]", "data.path must be set"], 2),
    # --- an earlier run's data touched before ---
    Case("resume-never-into-old-run", lambda w: [*SHORT, "train.resume=never", f"run_dir={w.interrupted}"],
         ["train.resume=never starts over", "holds an earlier run's checkpoints"]),
    Case("old-run-dir-missing-data", lambda w: [*SHORT, "data=alpaca", f"data.path={w.root}/gone.jsonl",
                                                f"run_dir={w.interrupted}"], ["gone.jsonl does not exist"]),
    Case("old-run-dir-other-composition", lambda w: [*SHORT, "train.lr=1e-3", f"run_dir={w.interrupted}"],
         ["composed differently", "train.lr"]),
    # --- accepted silently before ---
    Case("plus-adds-unknown-key", lambda w: ["+quant.bitz=4"], ["quant.bitz is not a setting", "quant.bits"], 2),
    Case("max-samples-negative", lambda w: ["data.max_samples=-1"],
         ["[data.max_samples] data.max_samples=-1 must be null or at least 1"], 2),
    Case("max-steps-zero", lambda w: ["train.max_steps=0"], ["train.max_steps must be -1 or at least 1, not 0"], 2),
    Case("unknown-experiment", lambda w: ["experiment=nope"], ["experiment=nope is not an experiment option"], 2),
    Case("group-removed", lambda w: ["~quant"], ["~quant removes quant", "quant=none"], 2),
    # --- wrong or unhelpful messages before ---
    Case("data-path-is-a-dir", lambda w: ["data=alpaca", f"data.path={w.files['data_dir']}"], ["is a directory"]),
    Case("batch-size-zero", lambda w: ["train.batch_size=0"], ["train.batch_size must be at least 1, not 0"], 2),
    Case("batch-size-negative", lambda w: ["train.batch_size=-1"], ["train.batch_size must be at least 1, not -1"], 2),
    Case("max-seq-len-zero", lambda w: ["train.max_seq_len=0"], ["train.max_seq_len must be at least 8, not 0"], 2),
    Case("misspelled-key", lambda w: ["quant.bitz=4"], ["quant.bitz is not a setting (did you mean quant.bits?)"], 2),
    Case("misspelled-choice", lambda w: ["strategy=fsdpp"], ["strategy=fsdpp is not a strategy option",
                                                               "did you mean fsdp?"], 2),
    Case("wrong-type", lambda w: ["quant.bits=four"], ["quant.bits=four is not a whole number"], 2),
    Case("sbatch-without-cluster", lambda w: ["launcher=slurm"], ["cannot reach a Slurm cluster", "login node"],
         env={"SLURM_CONF": "/nonexistent/slurm.conf"}, needs=_no_sbatch),
    # --- wandb without a route to its server ---
    Case("wandb-online-unreachable", lambda w: ["logger=wandb", "logger.mode=online"],
         ["logger.mode=online", "cannot be reached", "logger.mode=auto"],
         env={"WANDB_API_KEY": "fake-key-for-test", "WANDB_BASE_URL": "http://127.0.0.1:9"}),
    # --- checkpoints qforge did not write ---
    Case("foreign-checkpoint", lambda w: [*SHORT, f"train.resume={w.foreign}"],
         ["was not written by a run of this output_root"]),
    Case("tampered-checkpoint", lambda w: [*SHORT, f"train.resume={w.tampered}"],
         ["changed after it was saved", "trainer_state.json"]),
    Case("unsigned-checkpoint", lambda w: [*SHORT, f"train.resume={w.unsigned}"], ["has no signed qforge manifest"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_and_touches_nothing(case: Case, world: World, tmp_path: Path) -> None:
    if case.needs and case.needs():
        pytest.skip(case.needs())
    outputs = world.root / "outputs"
    before = tree_hashes(outputs)
    fresh_root = tmp_path / "fresh-outputs"
    args = case.args(world)
    if not any(a.startswith("output_root=") for a in args):
        # Cases about a run dir under the shared outputs/ keep its output root (its checkpoint key); others get
        # a fresh root, which must still not exist afterwards.
        args += [f"output_root={outputs if any('run_dir=' in a or 'resume=' in a for a in args) else fresh_root}"]
    result = run_cli(*args, env=case.env)
    assert result.returncode == case.exit_code, (result.returncode, result.stderr[-3000:])
    line = error_line(result.stderr)
    for fragment in case.says:
        assert fragment in line, (fragment, line)
    assert "+quant" not in line and "To append" not in line  # never Hydra's harmful "+key" hint
    assert not fresh_root.exists(), sorted(fresh_root.rglob("*"))
    assert tree_hashes(outputs) == before, "an earlier run's files changed"


def test_ctrl_c_checkpoints_and_prints_how_to_resume(tmp_path: Path) -> None:
    """SIGINT mid-run: the next step is checkpointed, one line says where and how to resume, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    run_dir = tmp_path / "run"
    args = ["quant=none", "train.max_steps=200", "train.save_steps=2", "do_eval=false", "data.eval_fraction=0",
            f"output_root={tmp_path}", f"run_dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker = run_dir / "checkpoints" / "checkpoint-2" / "qforge_complete.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the interrupt"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = [x for x in stderr.replace("\r", "\n").splitlines() if "qforge: interrupted at step" in x]
    step = int(line.split("interrupted at step ")[1].split()[0])
    assert step >= 2 and (run_dir / "checkpoints" / f"checkpoint-{step}" / "qforge_complete.json").is_file()
    assert f"run_dir={run_dir}" in line and "python train.py" in line
    assert not (run_dir / "metrics.json").exists()
