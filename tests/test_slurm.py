"""launcher=slurm against a real Slurm cluster on this machine (tests/slurm/fixtures.py starts it).

What must hold: a sweep is validated whole before anything is queued, illegal combinations never
reach Slurm, the legal ones run as ONE job array; a run that raises ends FAILED; a warned job
checkpoints, requeues itself and resumes to exactly the step count and losses of an uninterrupted
run; slurm/train.sbatch works when a user sbatches it by hand. Jobs are CPU-only (gpus_per_node=0)
with one CPU each, so the cluster's two CPUs run two jobs at once.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from launchers.slurm import SlurmJob, job_states, render_sbatch, wait_for
from tests.conftest import REPO, run_cli
from tests.slurm.fixtures import slurm_cluster  # noqa: F401  (the session fixture)


def on_cluster(test: Any) -> Any:
    """Needs the real cluster; slow (jobs train for real)."""
    return pytest.mark.slurm(pytest.mark.slow(pytest.mark.usefixtures("slurm_cluster")(test)))

TINY_JOB = ["launcher=slurm", "launcher.slurm.gpus_per_node=0", "launcher.slurm.cpus_per_task=1",
            "train.max_seq_len=128", "train.batch_size=2", "train.eval_batch_size=4"]


@pytest.fixture(scope="module")
def tiny_model() -> None:
    """Build the embedded model once here, so concurrent jobs never race to build it."""
    from trainer.compose import compose
    from trainer.tiny import ensure_tiny_model

    ensure_tiny_model(compose([]).model.tiny)


def _job_ids() -> set:
    listing = subprocess.run(["scontrol", "-o", "show", "jobs"], capture_output=True, text=True).stdout
    return set(re.findall(r"^JobId=(\d+)", listing, re.M))


@on_cluster
def test_sweep_validates_first_and_submits_legal_combinations_as_one_array(tiny_model: None, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = run_cli("-m", *TINY_JOB, "peft=lora,dora,full", "train.max_steps=3", "train.eval_steps=3",
                     "train.save_steps=3", "train.logging_steps=1", "launcher.slurm.wait=true",
                     f"hydra.sweep.dir={sweep}", timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    err = result.stderr
    # Validation of all three is printed before the one submission; the illegal one says rule and fix.
    assert err.index("validated 3 combination(s)") < err.index("submitted 2 job(s) as Slurm array")
    assert re.search(r"#2 peft=full: ILLEGAL, not submitted\n\s+error: \[quant\.lora_family_only\].*Fix:", err)

    manifest = json.loads((sweep / "sweep.json").read_text())
    array_id = manifest["array_job_id"]
    assert [j["status"] for j in manifest["jobs"]] == ["submitted", "submitted", "illegal"]
    assert [j.get("slurm_job") for j in manifest["jobs"]] == [f"{array_id}_0", f"{array_id}_1", None]
    # One array of exactly two tasks; the illegal combination got no job and no run dir.
    assert job_states(array_id) == {0: "COMPLETED", 1: "COMPLETED"}
    assert not (sweep / "2").exists()
    for index, peft in ((0, "lora"), (1, "dora")):
        run_dir = sweep / str(index)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 3
        assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert config.get("use_dora", False) == (peft == "dora")
        assert (sweep / "slurm" / f"{array_id}_{index}.out").exists()
    # The dependent report job wrote the report when the array ended; the sweep said where.
    assert (sweep / "report.md").exists() and f"report: {sweep / 'report.md'}" in err
    print(f"sweep of 3 (2 jobs) took {time.monotonic() - started:.0f} s")

    (sweep / "report.md").unlink()
    (sweep / "report.png").unlink()
    report = subprocess.run([sys.executable, "-m", "trainer.report", str(sweep)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert report.returncode == 0, report.stderr
    table = (sweep / "report.md").read_text()
    assert "| # | peft | status | final train loss | final eval loss | tokens/s | peak memory | wall time |" in table
    rows = [line for line in table.splitlines() if re.match(r"\| \d ", line)]
    assert len(rows) == 3
    assert rows[0].startswith("| 0 | lora | COMPLETED | ") and rows[1].startswith("| 1 | dora | COMPLETED | ")
    assert "| 2 | full | skipped: illegal |" in rows[2] and "quant.lora_family_only" in rows[2]
    final_eval = json.loads((sweep / "0" / "metrics.json").read_text())["eval_loss"]
    assert f"{final_eval:.4f}" in rows[0]
    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@on_cluster
def test_strict_sweep_with_an_illegal_combination_submits_nothing(tmp_path: Path) -> None:
    before = _job_ids()
    result = run_cli("-m", *TINY_JOB, "peft=lora,full", "launcher.slurm.strict=true",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=300)
    assert result.returncode == 2
    assert "[quant.lora_family_only]" in result.stderr
    assert "strict=true: the sweep holds illegal combinations, so nothing was submitted" in result.stderr
    assert _job_ids() - before == set()  # no job was queued
    assert not (tmp_path / "sweep" / "sweep.json").exists() and not (tmp_path / "sweep" / "0").exists()


@on_cluster
def test_a_run_that_raises_ends_failed_in_slurm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Legal to compose, validate and find; fails inside the job, when the data is read.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    result = run_cli(*TINY_JOB, "data=alpaca", f"data.path={broken}", "launcher.slurm.wait=true",
                     f"run_dir={run_dir}", timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    job = re.search(r"submitted Slurm job (\d+)_0", result.stderr).group(1)
    assert job_states(job) == {0: "FAILED"}
    assert f"job {job}_0 ended FAILED" in result.stderr
    log = (run_dir / "slurm" / f"{job}_0.out").read_text(errors="replace")
    assert "broken.jsonl line 2 is not valid JSON" in log and "training exited with status 1" in log
    assert not (run_dir / "metrics.json").exists()


@on_cluster
def test_warned_job_checkpoints_requeues_and_resumes_like_an_uninterrupted_run(tiny_model: None,
                                                                               tmp_path: Path) -> None:
    """Also runs slurm/train.sbatch by hand (the uninterrupted twin), as a user would."""
    training = ["train.max_steps=12", "train.save_steps=3", "train.eval_steps=12", "train.logging_steps=1",
                "train.max_seq_len=128", "train.batch_size=2", "train.eval_batch_size=4"]
    preempted, twin = tmp_path / "preempted", tmp_path / "twin"
    started = time.monotonic()
    submitted = run_cli(*TINY_JOB, *training, "logger=wandb", "logger.mode=offline", f"run_dir={preempted}")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"submitted Slurm job (\d+)_0", submitted.stderr).group(1)
    hand = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/twin-%j.out",
         f"--export=ALL,QFORGE_ROOT={REPO},QFORGE_PYTHON={sys.executable},QFORGE_RUN_DIR={twin}",
         str(REPO / "slurm" / "train.sbatch"), *training], capture_output=True, text=True, cwd=tmp_path)
    assert hand.returncode == 0, hand.stderr
    twin_job = hand.stdout.strip()

    # Mid-training: once the first checkpoint is complete, Slurm's warning signal reaches the batch script.
    marker = preempted / "checkpoints" / "checkpoint-3" / "qforge_complete.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline, (preempted / "slurm" / f"{job}_0.out").read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR2", f"{job}_0"], check=True)

    assert wait_for(job, 1, timeout=400, max_poll=1) == {0: "COMPLETED"}
    assert wait_for(twin_job, 1, timeout=300, max_poll=1, array=False) == {0: "COMPLETED"}
    print(f"preemption + twin took {time.monotonic() - started:.0f} s")

    log = (preempted / "slurm" / f"{job}_0.out").read_text(errors="replace")
    assert "warning signal received" in log and f"requeueing job {job}" in log
    assert "attempt 0 on" in log and "attempt 1 on" in log
    assert re.search(r"Restarts=1\b", subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                                      text=True).stdout)
    first, second = [json.loads(line) for line in (preempted / "attempts.jsonl").read_text().splitlines()]
    stop = first["last_step"]
    assert first["ended"] == "preempted" and 3 < stop < 12
    # Resumed exactly where it stopped: nothing lost, no step trained twice.
    assert second == {**second, "ended": "finished", "first_step": stop, "last_step": 12}
    assert first["steps_trained"] + second["steps_trained"] == 12
    metrics = json.loads((preempted / "metrics.json").read_text())
    reference = json.loads((twin / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stop
    assert metrics["steps"] == reference["steps"] == 12

    def losses(m: dict) -> list:
        return [(h["step"], h["loss"]) for h in m["log_history"] if "loss" in h]

    assert [s for s, _ in losses(metrics)] == list(range(1, 13))
    assert [loss for _, loss in losses(metrics)] == pytest.approx([loss for _, loss in losses(reference)], rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert (twin / "adapter" / "adapter_model.safetensors").exists()
    assert not (twin / "attempts.jsonl").read_text().count("preempted")
    # The requeued job continued the same wandb run: two offline segments, one run id.
    run_id = (preempted / "wandb_run_id").read_text().strip()
    segments = sorted(p.name for p in (preempted / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(name.endswith(f"-{run_id}") for name in segments)


@on_cluster
def test_a_two_node_job_trains_one_run_and_a_preempted_one_resumes_exactly(tiny_model: None, tmp_path: Path) -> None:
    """launcher.slurm.nodes=2 for real: two slurmd node agents on this host, one task per node, the head node found
    inside the allocation, a c10d rendezvous, torchrun on each node; warned mid-run, the job checkpoints on both
    nodes, requeues and resumes, and ends where a 2-process run of the same work ends."""
    from tests.slurm.fixtures import NODES

    assert NODES >= 2
    training = ["strategy=ddp", "train.max_steps=12", "train.save_steps=3", "train.eval_steps=12",
                "train.logging_steps=1", "train.max_seq_len=128", "train.batch_size=2", "train.eval_batch_size=4",
                "train.callbacks=[tests.probes:rank_params]"]
    run_dir, reference_dir = tmp_path / "two-node", tmp_path / "reference"
    submitted = run_cli(*TINY_JOB, "launcher.slurm.nodes=2", *training, f"run_dir={run_dir}")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"submitted Slurm job (\d+)_0", submitted.stderr).group(1)

    marker = run_dir / "checkpoints" / "checkpoint-3" / "qforge_complete.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline, (run_dir / "slurm" / f"{job}_0.out").read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR2", f"{job}_0"], check=True)
    assert wait_for(job, 1, timeout=400, max_poll=1) == {0: "COMPLETED"}
    # The same work as one node with two processes, outside Slurm: what the two-node job must end at.
    reference = run_cli(*[o for o in TINY_JOB if not o.startswith("launcher")], *training, "launcher=torchrun",
                        "launcher.nproc_per_node=2", f"run_dir={reference_dir}", timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    log = (run_dir / "slurm" / f"{job}_0.out").read_text(errors="replace")
    assert "2 node(s) x 1 process(es)" in log and f"requeueing job {job}" in log
    nodes = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert re.search(r"NumNodes=2\b", nodes), nodes
    first, second = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    stop = first["last_step"]
    assert first["ended"] == "preempted" and second["first_step"] == stop and second["last_step"] == 12
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference_dir / "metrics.json").read_text())
    assert metrics["world_size"] == expected["world_size"] == 2 and metrics["steps"] == 12

    def norms(m: dict) -> list:
        return [(h["step"], h["grad_norm"]) for h in m["log_history"] if "grad_norm" in h]

    assert [s for s, _ in norms(metrics)] == list(range(1, 13))
    assert [g for _, g in norms(metrics)] == pytest.approx([g for _, g in norms(expected)], rel=1e-5)
    assert metrics["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    params = [json.loads((run_dir / f"rank_params-{r}.json").read_text()) for r in range(2)]
    assert params[0]["sha256"] == params[1]["sha256"]  # the two nodes' ranks trained one model


def _cluster(**changes: object) -> SimpleNamespace:
    base = dict(partition="gpu", account="proj", qos="high", time="02:00:00", nodes=4, gpus_per_node=8,
                cpus_per_task=12, mem="400G", constraint="h100", signal="USR2@300", extra=["--exclusive"],
                setup=["module load cuda/12.4"], job_name="qforge")
    return SimpleNamespace(**{**base, **changes})


def test_multi_node_rendering_starts_torchrun_per_node_with_one_rendezvous(tmp_path: Path) -> None:
    """A second node cannot exist on this machine: the multi-node script is checked as rendered
    (and with bash -n); the same code path runs for real with nodes=1 in the tests above."""
    jobs = [SlurmJob(0, ["quant=bnb4", "peft=lora"], "/runs/0"), SlurmJob(1, ["quant=hqq", "peft=lora"], "/runs/1")]
    script = render_sbatch(_cluster(), jobs, tmp_path / "logs", python="/env/bin/python", root=Path("/code"))
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "#SBATCH --mem=400G", "#SBATCH --constraint=h100",
                 "#SBATCH --signal=B:USR2@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'logs'}/%A_%a.out", "#SBATCH --array=0-1", "#SBATCH --exclusive",
                 "GPUS_PER_NODE=8", "NPROC=8", "WARNING_SIGNAL=USR2", 'trap on_warning "$WARNING_SIGNAL"',
                 "module load cuda/12.4", '"launcher.slurm.gpus_per_node=${GPUS_PER_NODE}"',
                 "    1) RUN_DIR=/runs/1; OVERRIDES=(quant=hqq peft=lora) ;;",
                 'HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
                 'srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address',
                 'srun --nodes="$NNODES" --ntasks-per-node=1',
                 '--rdzv-backend=c10d --rdzv-endpoint="${HEAD_ADDR}:${RDZV_PORT}" --rdzv-id="${SLURM_JOB_ID}"',
                 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in script, line
    assert script.count("#SBATCH --gpus-per-node") == 1 and "--node-rank=" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    cpu = render_sbatch(_cluster(gpus_per_node=0, nodes=1, partition=None, account=None, qos=None, mem=None,
                                 constraint=None, extra=[], setup=[]), jobs[:1], tmp_path, python="python")
    assert "--gpus" not in cpu.split("qforge:header end")[0] and "NPROC=1" in cpu
    assert "--partition" not in cpu and "--array=0-0" in cpu


@pytest.mark.parametrize("override, rule", [
    ("launcher.slurm.time='4 hours'", "slurm.time"), ("launcher.slurm.signal=USR9@60", "slurm.signal"),
    ("launcher.slurm.extra=[exclusive]", "slurm.extra"), ("launcher.slurm.nodes=0", "slurm.sizes"),
])
def test_bad_cluster_settings_are_rules_checked_before_submission(override: str, rule: str) -> None:
    """Ordinary rules (trainer/launcher_rules.py): refused in a dry run too, listed in the generated docs."""
    from trainer.compose import compose
    from trainer.validate import validate

    assert [v.rule_id for v in validate(compose(["launcher=slurm", override])).errors] == [rule]
    assert validate(compose(["launcher=slurm"])).ok
    refused = run_cli("launcher=slurm", override, "dry_run=true")
    assert refused.returncode == 2 and f"[{rule}]" in refused.stderr and "Traceback" not in refused.stderr


def test_cluster_profile_example_matches_the_schema() -> None:
    import yaml
    from omegaconf import OmegaConf

    from trainer.schema import LauncherConfig

    profile = yaml.safe_load((REPO / "slurm" / "cluster_profile.example.yaml").read_text())
    merged = OmegaConf.merge(OmegaConf.structured(LauncherConfig), profile)  # unknown keys or bad types raise
    assert merged.name.value == "slurm" and merged.slurm.gpus_per_node >= 0


def test_sweep_dry_run_validates_and_prints_the_array_without_a_cluster(tmp_path: Path) -> None:
    """dry_run=true on a Slurm sweep: every combination checked, the array script printed, nothing made."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "launcher=slurm", "launcher.slurm.gpus_per_node=0", "peft=full,lora,dora", "dry_run=true",
                     f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "#0 peft=full: ILLEGAL, not submitted" in result.stderr and "[quant.lora_family_only]" in result.stderr
    assert "nothing was submitted" in result.stderr
    assert "#SBATCH --array=0-1" in result.stdout
    assert f"0) RUN_DIR={sweep}/1;" in result.stdout and f"1) RUN_DIR={sweep}/2;" in result.stdout
    # Hydra made a dir for job 0 before qforge saw the sweep; an illegal job 0 leaves nothing behind.
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]
