"""`python train.py -m launcher=slurm ...`: validate every combination, then submit ONE job array.

Hydra's BasicSweeper has already composed every combination (typos fail there) and starts job 0;
trainer/entry.py hands job 0 to `submit_sweep_from_hydra`, which re-expands the sweep from the
multirun.yaml the sweeper saved (with Hydra's own override parser and expansion, so the job numbers
match Hydra's), validates all of it, submits the legal combinations as one array, and exits, so
Hydra runs nothing locally. Illegal combinations are printed with their rule and fix and get no run
dir and no job. Everything the sweep decided is written to <sweep dir>/sweep.json for the report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, TextIO

from omegaconf import OmegaConf

from launchers.local import without_keys
from launchers.slurm import REPO_ROOT, SlurmJob, render_sbatch, sbatch, submit_array, wait_for
from trainer import rundir
from trainer.errors import UserError
from trainer.rules import Severity, Violation

MANIFEST = "sweep.json"


@dataclass
class Combination:
    index: int
    overrides: List[str]
    cfg: Any = None
    errors: List[Violation] = field(default_factory=list)
    warnings: List[Violation] = field(default_factory=list)
    run_dir: Optional[str] = None

    @property
    def legal(self) -> bool:
        return not self.errors


def submit_sweep_from_hydra(cfg: Any) -> NoReturn:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir).absolute()
    master = OmegaConf.load(sweep_dir / "multirun.yaml")
    params = master.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(master.hydra.overrides.task)
    # Hydra made a dir for job 0 before calling us; an illegal job 0 must not leave one behind.
    job0_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        code = run_sweep(expand(arguments), sweep_dir)
    finally:
        if job0_dir.is_dir() and not any(job0_dir.iterdir()):
            job0_dir.rmdir()
    sys.exit(code)


def expand(arguments: Sequence[str]) -> List[List[str]]:
    """The sweep's combinations, in Hydra's order (job i is Hydra's job number i)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(arguments))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as err:
        raise UserError(f"cannot expand the sweep: {err} Fix: sweep with comma lists, e.g. quant=bnb4,bnb8.") from err


def swept_keys(combos: Sequence[Sequence[str]]) -> List[str]:
    """Keys whose value differs between combinations: the columns of the sweep."""
    values: Dict[str, set] = {}
    order: List[str] = []
    for combo in combos:
        for override in combo:
            key, _, value = override.partition("=")
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    varying = [k for k in order if len(values[k]) > 1]
    return varying or order


def without_run_dir(overrides: Sequence[str]) -> List[str]:
    return without_keys(list(overrides), ("run_dir",))


def check_all(combos: Sequence[Sequence[str]], sweep_dir: Path) -> List[Combination]:
    """Compose, validate and check the inputs of every combination; nothing is created or submitted here."""
    from trainer import inputs
    from trainer.compose import compose_all
    from trainer.validate import validate

    checked = []
    for index, (overrides, cfg) in enumerate(zip(combos, compose_all(combos))):
        combo = Combination(index, list(overrides), cfg)
        if cfg.launcher.name.value != "slurm":
            raise UserError(f"combination #{index} ({' '.join(overrides)}) does not use launcher=slurm; "
                            "a Slurm sweep cannot mix launchers: sweep each launcher separately.")
        report = validate(cfg)
        combo.errors, combo.warnings = report.errors, report.warnings
        if combo.legal:
            combo.run_dir = str(sweep_dir / str(index))
            try:
                from trainer.data.spec import data_spec

                inputs.check(cfg, combo.run_dir, data_spec(cfg))
            except UserError as err:
                combo.errors.append(Violation("inputs", Severity.error, str(err), "fix it and submit again."))
                combo.run_dir = None
        checked.append(combo)
    slurm_settings = {json.dumps(OmegaConf.to_container(c.cfg.launcher.slurm), sort_keys=True) for c in checked}
    if len(slurm_settings) > 1:
        raise UserError("launcher.slurm settings differ between combinations, but one job array has one set of "
                        "resources. Fix: sweep cluster settings in separate submissions.")
    return checked


def print_validation(checked: Sequence[Combination], keys: Sequence[str], out: TextIO) -> None:
    illegal = [c for c in checked if not c.legal]
    print(f"qforge: validated {len(checked)} combination(s) before submitting anything: "
          f"{len(checked) - len(illegal)} legal, {len(illegal)} illegal", file=out)
    for combo in checked:
        choices = " ".join(o for o in combo.overrides if o.partition("=")[0] in keys) or " ".join(combo.overrides)
        print(f"  #{combo.index} {choices}: {'ok' if combo.legal else 'ILLEGAL, not submitted'}", file=out)
        for violation in combo.errors:
            print(f"      {violation.line()}", file=out)


def run_sweep(combos: Sequence[Sequence[str]], sweep_dir: Path, out: TextIO = sys.stderr) -> int:
    checked = check_all(combos, sweep_dir)
    keys = swept_keys(combos)
    print_validation(checked, keys, out)
    legal = [c for c in checked if c.legal]
    slurm = checked[0].cfg.launcher.slurm
    if len(legal) < len(checked) and slurm.strict:
        print("qforge: launcher.slurm.strict=true: the sweep holds illegal combinations, so nothing was submitted. "
              "Fix: drop the illegal values from the sweep, or set launcher.slurm.strict=false to submit the "
              "legal ones.", file=out)
        return 2
    if not legal:
        print("qforge: no legal combination; nothing was submitted.", file=out)
        return 2
    if checked[0].cfg.dry_run:
        # The array script exactly as it would be submitted; no run dir, no job.
        preview = [SlurmJob(t, without_run_dir(c.overrides), str(c.run_dir)) for t, c in enumerate(legal)]
        print(render_sbatch(slurm, preview, sweep_dir / "slurm"))
        print(f"qforge: dry_run=true: would submit {len(legal)} job(s) as one array; nothing was submitted.", file=out)
        return 0

    from trainer.plan import build_plan

    jobs = []
    for combo in legal:
        assert combo.run_dir is not None
        plan = build_plan(combo.cfg, run_dir=combo.run_dir)
        plan.warnings = [v.line() for v in combo.warnings]
        rundir.create(plan, rundir.Composition.of(combo.cfg, combo.overrides))
        jobs.append(SlurmJob(combo.index, without_run_dir(combo.overrides), combo.run_dir))
    # Array tasks are numbered 0..n-1 over the legal combinations; each keeps its combination's
    # run dir <sweep dir>/<combination number>, Hydra's numbering, so gaps show where illegal ones were.
    for task, job in enumerate(jobs):
        job.index = task
    manifest = _manifest(checked, keys, sweep_dir)
    log_dir = sweep_dir / "slurm"
    try:
        array_id = submit_array(slurm, jobs, log_dir, script_name="array.sbatch")
    except UserError:
        for job in jobs:  # nothing was queued: leave no run dirs that look like runs behind
            shutil.rmtree(job.run_dir, ignore_errors=True)
        raise
    task_of = {c.index: t for t, c in enumerate(legal)}
    for entry in manifest["jobs"]:
        if entry["status"] == "submitted":
            entry["slurm_job"] = f"{array_id}_{task_of[entry['index']]}"
    manifest["array_job_id"] = array_id
    _write_manifest(sweep_dir, manifest)
    report_id = None
    if slurm.report_job:
        try:
            report_id = _submit_report_job(slurm, sweep_dir, array_id)
        except UserError as err:  # the array is queued either way; the report can be run by hand
            print(f"qforge: warning: the report job was not submitted: {err}", file=out)
        manifest["report_job_id"] = report_id
        _write_manifest(sweep_dir, manifest)

    print(f"qforge: submitted {len(jobs)} job(s) as Slurm array {array_id} (tasks 0-{len(jobs) - 1}); "
          f"{len(checked) - len(jobs)} illegal combination(s) skipped.\n"
          f"qforge: sweep dir {sweep_dir}; logs in {log_dir}/; watch with: squeue -j {array_id}", file=out)
    report_cmd = f"python -m trainer.report {shlex.quote(str(sweep_dir))}"
    if report_id:
        print(f"qforge: when the array ends, job {report_id} writes {sweep_dir}/report.md "
              f"(or run: {report_cmd})", file=out)
    if not slurm.wait:
        return 0
    states = wait_for(array_id, len(jobs))
    if report_id:
        wait_for(report_id, 1, array=False)
    failed = {t: s for t, s in states.items() if s != "COMPLETED"}
    print(f"qforge: sweep finished: {len(states) - len(failed)} of {len(states)} job(s) COMPLETED"
          + (f", not completed: {', '.join(f'{array_id}_{t} {s}' for t, s in sorted(failed.items()))}" if failed
             else "") + f".\nqforge: sweep dir {sweep_dir}; report: {sweep_dir / 'report.md'} ({report_cmd})",
          file=out)
    return 1 if failed else 0


def _manifest(checked: Sequence[Combination], keys: Sequence[str], sweep_dir: Path) -> Dict[str, Any]:
    def choices(overrides: Sequence[str]) -> Dict[str, str]:
        pairs = (o.split("=", 1) for o in overrides if "=" in o)
        return {k: v for k, v in pairs if k in keys}

    return {
        "sweep_dir": str(sweep_dir),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "launcher": "slurm",
        "swept": list(keys),
        "jobs": [{
            "index": c.index,
            "overrides": c.overrides,
            "choices": choices(c.overrides),
            "status": "submitted" if c.legal else "illegal",
            "run_dir": c.run_dir,
            "violations": [{"rule_id": v.rule_id, "message": v.message, "fix": v.fix} for v in c.errors],
        } for c in checked],
    }


def _write_manifest(sweep_dir: Path, manifest: Dict[str, Any]) -> None:
    path = sweep_dir / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def _submit_report_job(slurm: Any, sweep_dir: Path, array_id: str) -> str:
    """A one-CPU job that runs after every array task (afterany) and writes the sweep report."""
    q = shlex.quote
    log_dir = sweep_dir / "slurm"
    options = [f"--job-name={slurm.job_name}-report", f"--dependency=afterany:{array_id}", "--ntasks=1",
               "--cpus-per-task=1", "--time=00:10:00", f"--output={log_dir}/report-%j.out"]
    options += [f"--{k}={getattr(slurm, k)}" for k in ("partition", "account", "qos") if getattr(slurm, k)]
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options),
             "# Written by launchers/slurm_sweep.py: the sweep report, once every array task has ended.",
             f"cd {q(str(REPO_ROOT))}", *[str(s) for s in slurm.setup],
             f"{q(sys.executable)} -m trainer.report {q(str(sweep_dir))}"]
    script = log_dir / "report.sbatch"
    script.write_text("\n".join(lines) + "\n")
    return sbatch(script)
