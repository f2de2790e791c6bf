"""Exact resume: SIGKILL every process of a 2-process run after its first checkpoint, re-run the same
command with the same run_dir, and it continues from that checkpoint to the same end as an uninterrupted
run (same number of optimizer steps, same gradients after the resume point, same adapter). Plus checkpoint
completeness: which checkpoint a run resumes from, and rotation."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cpu_paths
from tests.strategy_checks import REPO, STEPS, command, finished_run, kill_tree, metrics
from trainer import checkpoints
from trainer.errors import UserError

# The interrupted run saves after every step, so the kill after its first checkpoint (step 1) lands
# well before the end (step 8, seven saves later) even on a fast machine. Checkpoints do not change what
# is trained, so the uninterrupted reference (saving every 4) is still step-for-step comparable.
KILLED_SAVE_STEPS = 1
KEY = b"k" * 32  # a checkpoint key for the hand-made checkpoints below


def _kill_after_first_checkpoint(cmd: list, run_dir: Path, env: dict) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = run_dir / "checkpoints" / f"checkpoint-{KILLED_SAVE_STEPS}" / checkpoints.COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    kill_tree(proc)
    assert not (run_dir / "metrics.json").exists(), "the run finished before the kill landed"


RESUME_CASES = [pytest.param("ddp", {}, id="ddp"), pytest.param("fsdp", {}, id="fsdp"),
                *[pytest.param("ddp", p.values[0], id=f"ddp-{p.id}", marks=p.marks)
                  for p in cpu_paths() if p.id != "cpu-native"]]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, cpu_env", RESUME_CASES)
def test_killed_run_resumes_exactly(strategy: str, cpu_env: dict, tmp_path: Path) -> None:
    reference_dir = finished_run(strategy, "bnb4", cpu_env)
    reference = metrics(reference_dir)
    env = {**os.environ, **cpu_env}
    run_dir = tmp_path / "run"
    cmd = command(strategy, "bnb4", run_dir, save_steps=KILLED_SAVE_STEPS)
    _kill_after_first_checkpoint(cmd, run_dir, env)

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    m = metrics(run_dir)
    killed_at = m["resumed_from_step"]
    assert KILLED_SAVE_STEPS <= killed_at < STEPS, m.get("resumed_from_step")
    assert m["steps"] == reference["steps"] == STEPS
    # Training after the resume point is the uninterrupted run's, step for step: same data order, RNG,
    # optimizer and scheduler state, so the same gradient norms and learning rates, and in the end the
    # same adapter weights. (The Trainer's logged *loss* of the first steps after a resume is averaged
    # differently by transformers, so it is not compared; the gradients it came from are.)
    after = {e["step"]: (e["grad_norm"], e["learning_rate"]) for e in m["log_history"]
             if "grad_norm" in e and e["step"] > killed_at}
    ref = {e["step"]: (e["grad_norm"], e["learning_rate"]) for e in reference["log_history"]
           if "grad_norm" in e and e["step"] > killed_at}
    assert after.keys() == ref.keys() and after
    for step in after:
        assert after[step] == pytest.approx(ref[step], rel=1e-4), (step, after[step], ref[step])
    # The whole run's mean step loss, not this attempt's: the checkpoint carried the sum of the steps before it.
    assert m["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    resumed_adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    reference_adapter = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    assert resumed_adapter.keys() == reference_adapter.keys()
    for key, value in resumed_adapter.items():
        assert torch.allclose(value, reference_adapter[key], atol=1e-5), key

    # The run is finished now: the same command refuses to overwrite it.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode != 0 and "finished run" in again.stderr and "Traceback" not in again.stderr


def test_a_run_killed_before_its_outputs_resumes_to_exactly_max_steps(tmp_path: Path) -> None:
    """Killed after its last checkpoint, before metrics.json: the re-run trains no step past max_steps."""
    from tests.conftest import run_cli

    args = ["quant=none", "train.max_steps=12", "train.save_steps=6", "train.eval_steps=12", "train.lr=1e-3",
            "train.scheduler=constant", f"output_root={tmp_path}", f"run_dir={tmp_path / 'run'}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    finished = metrics(run_dir)
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    (run_dir / "metrics.json").unlink()  # as if killed between the step-12 checkpoint and the outputs

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = metrics(run_dir)
    assert resumed["resumed_from_step"] == 12 and resumed["steps"] == finished["steps"] == 12
    assert resumed["train_loss"] == pytest.approx(finished["train_loss"], rel=1e-6)
    assert resumed["eval_loss"] == pytest.approx(finished["eval_loss"], rel=1e-6)
    # A constant schedule: one more step would have moved the weights.
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        checkpoints.mark_complete(path, step, KEY)
    return path


def test_resume_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    root = checkpoints.checkpoint_dir(str(tmp_path))
    _fake_checkpoint(root, 4, complete=True)
    _fake_checkpoint(root, 10, complete=True)
    torn = _fake_checkpoint(root, 12, complete=False)  # the save a crash interrupted
    assert checkpoints.resume_path("auto", str(tmp_path), KEY) == str(root / "checkpoint-10")
    assert not torn.exists()  # discarded so the re-run's save of step 12 starts clean
    assert checkpoints.resume_path("never", str(tmp_path)) is None
    assert checkpoints.resume_path(str(root / "checkpoint-4"), str(tmp_path)) == str(root / "checkpoint-4")
    assert checkpoints.resume_path("auto", str(tmp_path / "elsewhere")) is None


def test_resume_refuses_a_missing_or_torn_checkpoint(tmp_path: Path) -> None:
    torn = _fake_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(UserError, match="not a complete"):
        checkpoints.resume_path(str(torn), str(tmp_path))
    with pytest.raises(UserError, match="not a directory"):
        checkpoints.resume_path(str(tmp_path / "nope"), str(tmp_path))


def test_rotation_keeps_the_newest_complete_ones(tmp_path: Path) -> None:
    for step, done in ((2, True), (4, False), (6, True), (8, True)):
        _fake_checkpoint(tmp_path, step, complete=done)
    checkpoints.rotate(tmp_path, keep=2)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-8"]
