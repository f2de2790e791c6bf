"""`python -m trainer.report <sweep dir>`: a markdown table and a PNG of loss curves for a sweep.

Reads <sweep dir>/sweep.json when the sweep went to Slurm (it also knows the illegal combinations
and their rules), otherwise the numbered job dirs of a local `-m` sweep. Every number comes from the
runs' own metrics.json; a run without one is reported by its Slurm state when Slurm still knows it.
Writes <sweep dir>/report.md and <sweep dir>/report.png and prints where they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


@dataclass
class Row:
    index: int
    choices: Dict[str, str]
    status: str
    run_dir: Optional[Path] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def history(self) -> List[Dict[str, Any]]:
        return list(self.metrics.get("log_history") or [])


def collect(sweep_dir: Path) -> tuple[List[str], List[Row]]:
    manifest = sweep_dir / "sweep.json"
    if manifest.exists():
        return _from_manifest(json.loads(manifest.read_text()))
    return _from_job_dirs(sweep_dir)


def _from_manifest(manifest: Dict[str, Any]) -> tuple[List[str], List[Row]]:
    rows = []
    for job in manifest["jobs"]:
        if job["status"] == "illegal":
            rules = ", ".join(v["rule_id"] for v in job["violations"])
            rows.append(Row(job["index"], job["choices"], "skipped: illegal", notes=rules))
            continue
        rows.append(_run_row(job["index"], job["choices"], Path(job["run_dir"]), job.get("slurm_job")))
    return list(manifest["swept"]), rows


def _from_job_dirs(sweep_dir: Path) -> tuple[List[str], List[Row]]:
    dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not dirs:
        raise SystemExit(f"error: {sweep_dir} holds no sweep.json and no numbered job dirs; pass the dir a "
                         "`python train.py -m ...` sweep printed.")
    overrides = {}
    for d in dirs:
        path = d / ".hydra" / "overrides.yaml"
        overrides[d] = yaml.safe_load(path.read_text()) if path.exists() else []
    pairs = {d: dict(o.split("=", 1) for o in ovs if "=" in o) for d, ovs in overrides.items()}
    keys = list(dict.fromkeys(k for p in pairs.values() for k in p))
    swept = [k for k in keys if len({p.get(k) for p in pairs.values()}) > 1] or keys
    rows = [_run_row(int(d.name), {k: pairs[d].get(k, "") for k in swept}, d, None) for d in dirs]
    return swept, rows


def _run_row(index: int, choices: Dict[str, str], run_dir: Path, slurm_job: Optional[str]) -> Row:
    row = Row(index, choices, "COMPLETED", run_dir)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        row.metrics = json.loads(metrics_path.read_text())
    else:
        row.status = _slurm_state(slurm_job) or "no metrics.json (failed or still running)"
    attempts_path = run_dir / "attempts.jsonl"
    if attempts_path.exists():
        attempts = [json.loads(line) for line in attempts_path.read_text().splitlines() if line.strip()]
        requeues = sum(1 for a in attempts if a.get("ended") == "preempted")
        if requeues:
            row.notes = f"preempted and resumed {requeues}x"
    return row


def _slurm_state(job: Optional[str]) -> Optional[str]:
    if not job or shutil.which("scontrol") is None:
        return None
    from launchers.slurm import job_states

    states = job_states(job)
    return next(iter(states.values())) if states else None


def _last(history: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    values = [h[key] for h in history if key in h]
    return float(values[-1]) if values else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(sweep_dir: Path, keys: Sequence[str], rows: Sequence[Row], png: Optional[Path]) -> str:
    header = ["#", *keys, "status", "final train loss", "final eval loss", "tokens/s", "peak memory",
              "wall time", "notes"]
    lines = [f"# Sweep report: {sweep_dir}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        m = row.metrics
        train_loss = _last(row.history, "loss") if row.history else m.get("train_loss")
        peak = m.get("peak_memory_bytes")
        peak_text = f"{peak / 2**30:.2f} GiB ({m.get('peak_memory_kind', '')})" if peak else ""
        wall = m.get("wall_seconds")
        cells = [str(row.index), *(row.choices.get(k, "") for k in keys), row.status,
                 _fmt(train_loss, ".4f"), _fmt(m.get("eval_loss"), ".4f"), _fmt(m.get("tokens_per_second"), ".0f"),
                 peak_text, f"{wall:.0f} s" if wall is not None else "", row.notes]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    illegal = [r for r in rows if r.status.startswith("skipped")]
    lines += ["", f"{len(rows)} combination(s): {sum(r.status == 'COMPLETED' for r in rows)} completed, "
              f"{len(illegal)} skipped as illegal"
              + (" (rule ids in notes; each rule's message and fix are in sweep.json)." if illegal else ".")]
    if png:
        lines += ["", f"![loss curves]({png.name})"]
    return "\n".join(lines) + "\n"


def plot(sweep_dir: Path, keys: Sequence[str], rows: Sequence[Row]) -> Optional[Path]:
    """One panel per run with a loss history, side by side on a shared loss axis."""
    runs = [r for r in rows if r.history]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], runs):
        train = [(h["step"], h["loss"]) for h in row.history if "loss" in h and "step" in h]
        evals = [(h["step"], h["eval_loss"]) for h in row.history if "eval_loss" in h and "step" in h]
        if train:
            ax.plot(*zip(*train), ".-", label="train", color="tab:blue")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval", color="tab:orange")
        ax.set_title(f"#{row.index} " + " ".join(f"{k}={row.choices.get(k, '')}" for k in keys), fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    fig.tight_layout()
    path = sweep_dir / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(sweep_dir: Path) -> tuple[Path, Optional[Path]]:
    keys, rows = collect(sweep_dir)
    png = plot(sweep_dir, keys, rows)
    md = sweep_dir / "report.md"
    md.write_text(markdown(sweep_dir, keys, rows, png))
    return md, png


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep dir a `python train.py -m ...` run printed")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory; pass the sweep dir a -m run printed.", file=sys.stderr)
        sys.exit(2)
    md, png = write_report(args.sweep_dir.absolute())
    print(md.read_text())
    print(f"qforge: report table {md}" + (f"; loss curves {png}" if png else "; no run has a loss history yet"))


if __name__ == "__main__":
    main()
