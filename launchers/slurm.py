"""launcher=slurm: render slurm/train.sbatch for one run or a sweep's job array, submit it, optionally wait.

The submitting shell returns once sbatch has answered (hydra #692) unless launcher.slurm.wait=true. The plan
is written into the run dir at submission; inside the job the script starts torchrun on every node, and every
rank runs `python -m trainer.rank RUN_DIR` on that plan (a requeued job reads the same one). Failure
semantics are the script's: it exits with training's status, so a run that raised ends FAILED in Slurm
(hydra #1928), and it alone requeues a preempted run (see slurm/train.sbatch). The cluster settings were
checked as rules (trainer/launcher_rules.py) before anything was rendered.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

from trainer import rundir
from trainer.errors import UserError
from trainer.preemption import SIGNAL_SPEC, signal_name
from trainer.rundir import Composition
from trainer.specs import RunPlan

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "UNKNOWN"}


@dataclass
class SlurmJob:
    """One array task: the composition's overrides (without run_dir) and the run dir it owns."""

    index: int
    overrides: List[str]
    run_dir: str


def submit(plan: RunPlan, composition: Composition) -> None:
    """A single run: one job (an array of one)."""
    from launchers.local import without_keys

    slurm = settings(plan)
    made = rundir.dirs_to_make(Path(plan.run_dir))
    rundir.create(plan, composition)
    job = SlurmJob(0, without_keys(composition.overrides, ("run_dir",)), plan.run_dir)
    log_dir = Path(plan.run_dir) / "slurm"
    try:
        job_id = submit_array(slurm, [job], log_dir)
    except UserError:
        rundir.remove_made(made)  # nothing was queued: leave no run dir that looks like a run behind
        raise
    print(f"qforge: submitted Slurm job {job_id}_0; run dir {plan.run_dir}\n"
          f"qforge: log {log_dir}/{job_id}_0.out; watch with: squeue -j {job_id}", file=sys.stderr)
    if slurm.wait:
        states = wait_for(job_id, 1)
        state = states.get(0, "UNKNOWN")
        print(f"qforge: job {job_id}_0 ended {state}; outputs in {plan.run_dir}", file=sys.stderr)
        if state != "COMPLETED":
            sys.exit(1)


def settings(plan: RunPlan) -> Any:
    """launcher.slurm's settings from the plan, read as attributes (slurm.partition, slurm.nodes, ...)."""
    return SimpleNamespace(**(plan.launcher.slurm or {}))


def sbatch_signal(spec: str) -> str:
    """Always to the batch shell (B:): torchrun's agent would die of USR2's default action."""
    match = SIGNAL_SPEC.match(spec.strip().upper())
    assert match, spec
    seconds = match.group(2)
    return f"B:{signal_name(spec)}" + (f"@{seconds}" if seconds else "")


def header_lines(slurm: Any, n_jobs: int, log_dir: Path) -> List[str]:
    options = [f"--job-name={slurm.job_name}", f"--nodes={slurm.nodes}", "--ntasks-per-node=1"]
    if slurm.gpus_per_node > 0:
        options.append(f"--gpus-per-node={slurm.gpus_per_node}")
    options += [f"--cpus-per-task={slurm.cpus_per_task}", f"--time={slurm.time}"]
    for key in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(slurm, key)
        if value not in (None, ""):
            options.append(f"--{key}={value}")
    options += [f"--signal={sbatch_signal(str(slurm.signal))}", "--requeue", "--open-mode=append",
                f"--output={log_dir}/%A_%a.out", f"--array=0-{n_jobs - 1}"]
    options += [str(o) for o in slurm.extra]
    return [f"#SBATCH {o}" for o in options]


def job_lines(slurm: Any, jobs: Sequence[SlurmJob], python: str, root: Path) -> List[str]:
    """Which run this array task is: one `case` branch per task, readable in the rendered script."""
    q = shlex.quote
    nproc = max(int(slurm.gpus_per_node), 1)
    lines = [f"QFORGE_ROOT={q(str(root))}", f"PYTHON={q(python)}", f"GPUS_PER_NODE={int(slurm.gpus_per_node)}",
             f"NPROC={nproc}",
             f"WARNING_SIGNAL={signal_name(str(slurm.signal))}",
             'case "${SLURM_ARRAY_TASK_ID:-0}" in']
    for job in jobs:
        args = " ".join(q(o) for o in job.overrides)
        lines.append(f"    {job.index}) RUN_DIR={q(job.run_dir)}; OVERRIDES=({args}) ;;")
    lines += ['    *) echo "qforge: no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;', "esac"]
    if slurm.setup:
        lines.append("# launcher.slurm.setup")
        lines += [str(s) for s in slurm.setup]
    return lines


def render_sbatch(slurm: Any, jobs: Sequence[SlurmJob], log_dir: Path, python: Optional[str] = None,
                  root: Path = REPO_ROOT, template: Path = TEMPLATE) -> str:
    """slurm/train.sbatch with its header and job blocks filled in from the config."""
    if not template.is_file():
        raise UserError(f"the sbatch template {template} is missing: launcher=slurm renders it from a qforge "
                        "checkout; run from one (git clone), or restore slurm/train.sbatch.")
    text = template.read_text()
    text = _replace_block(text, "header", header_lines(slurm, len(jobs), log_dir))
    return _replace_block(text, "job", job_lines(slurm, jobs, python or sys.executable, root))


def _replace_block(text: str, name: str, lines: List[str]) -> str:
    pattern = re.compile(rf"^# qforge:{name} begin\n.*?^# qforge:{name} end\n", re.S | re.M)
    if not pattern.search(text):
        raise UserError(f"the sbatch template lacks its '# qforge:{name} begin/end' markers; "
                        "restore slurm/train.sbatch from the repository.")
    block = "\n".join([f"# qforge:{name} begin (rendered by launchers/slurm.py)", *lines, f"# qforge:{name} end"])
    return pattern.sub(lambda _: block + "\n", text, count=1)


def submit_array(slurm: Any, jobs: Sequence[SlurmJob], log_dir: Path, script_name: str = "job.sbatch") -> str:
    """Render, write and sbatch the array; returns the array's job id."""
    # sbatch of Slurm < 23.02 fails silently when the --output folder is missing (hydra #2100).
    log_dir.mkdir(parents=True, exist_ok=True)
    script = log_dir / script_name
    script.write_text(render_sbatch(slurm, jobs, log_dir))
    return sbatch(script)


def sbatch(script: Path, *options: str) -> str:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: launcher=slurm submits from a Slurm login node; "
                        "run there, or use launcher=local or launcher=torchrun here.")
    result = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(sbatch_refusal(result.stderr, script))
    return result.stdout.strip().split(";")[0]


# What sbatch prints when this host has no working Slurm client configuration or no controller to talk to.
_NO_CLUSTER = ("configuration source", "slurm.conf", "unable to contact slurm controller", "connection refused",
               "could not establish", "munge", "authentication", "cannot connect", "zero bytes were transmitted")


def sbatch_refusal(stderr: str, script: Path) -> str:
    """One sentence for a failed sbatch: no reachable cluster, or a job the cluster refused."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    reason = (lines[-1] if lines else "no message").removeprefix("sbatch: ").removeprefix("error: ")
    reason = reason.removeprefix("fatal: ").rstrip(".")
    if any(marker in stderr.lower() for marker in _NO_CLUSTER):
        return (f"sbatch on this host cannot reach a Slurm cluster ({reason}); submit from a login node of your "
                "cluster (where `sinfo` answers), or use launcher=local or launcher=torchrun here.")
    return (f"the cluster refused the job ({reason}); check launcher.slurm (partition, account, qos, time, "
            f"gpus_per_node) against `sinfo` and your cluster's limits; the script is {script}.")


def job_states(job_id: str) -> Optional[Dict[int, str]]:
    """Array task -> Slurm state from scontrol; None when Slurm no longer knows the job."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    states: Dict[int, str] = {}
    for line in result.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        state = fields.get("JobState", "UNKNOWN")
        for task in _task_ids(fields.get("ArrayTaskId", "0")):
            states[task] = state
    return states


def _task_ids(spec: str) -> List[int]:
    """'3', '0-4', '0,2,5-6' or '0-9%2' (pending tasks are listed as ranges)."""
    ids: List[int] = []
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            ids += range(int(low), int(high) + 1)
        elif part.isdigit():
            ids.append(int(part))
    return ids


def wait_for(job_id: str, n_tasks: int, max_poll: float = 5.0, timeout: Optional[float] = None,
             array: bool = True) -> Dict[int, str]:
    """Poll until every task has a terminal state, printing each change; gentle on slurmctld."""
    last: Dict[int, str] = {}
    pause = 1.0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        states = job_states(job_id)
        if states is None:  # aged out of slurmctld (MinJobAge): what we saw last is all we know
            return {t: last[t] if last.get(t) in TERMINAL_STATES else "UNKNOWN" for t in range(n_tasks)}
        for task, state in sorted(states.items()):
            if last.get(task) != state:
                print(f"qforge: job {job_id}{f'_{task}' if array else ''}: {state}", file=sys.stderr)
                pause = 1.0
        last.update(states)
        if all(last.get(t) in TERMINAL_STATES for t in range(n_tasks)):
            return {t: last[t] for t in range(n_tasks)}
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Slurm job {job_id} still not finished after {timeout:.0f} s: {last}")
        time.sleep(pause)
        pause = min(pause * 1.5, max_poll)
