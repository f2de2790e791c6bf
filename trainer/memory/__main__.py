"""python -m trainer.memory <overrides>: the breakdown of one composition; --sweep for a grid (a table and a PNG).

    python -m trainer.memory model=llama3_8b quant=bnb4 train.max_seq_len=8192     # the breakdown
    python -m trainer.memory --sweep train.max_seq_len=2048,8192,16384 train.batch_size=1,4 [--png out.png]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from trainer.memory import GIB, Prediction, predict


def render(p: Prediction) -> str:
    """The breakdown at the peak as an aligned text table, then every phase's total and the verdict."""
    if not p.known:
        return f"memory: {p.verdict()}"
    phase = p.peak_phase
    shown = p.breakdown()
    static = [] if phase is not None and phase.standalone else [t for t in p.static if t.bytes > 0]
    at_peak = [t for t in shown if t not in static]
    width = max([len(t.name) for t in shown] + [48]) + 2
    cal = p.calibration
    lines = [f"model: {p.shape} ({p.shape_source})",
             f"run: {p.strategy}, {p.world} GPU(s), {p.dtype}, {p.tokens} tokens per micro-batch, "
             f"{p.checkpointed} of {p.layers} layers checkpointed" + (f" (auto: {p.auto})" if p.auto else ""),
             "", f"{'term':<{width}}{'GiB/GPU':>9}"]
    lines += [f"{t.name:<{width}}{t.gib:>9.2f}" for t in static]
    if phase is not None:
        lines.append(f"-- at the peak: {phase.name}")
        lines += [f"{t.name:<{width}}{t.gib:>9.2f}" for t in at_peak]
    lines += [f"{'peak allocated (torch.cuda.max_memory_allocated)':<{width}}{p.peak_bytes / GIB:>9.2f}",
              f"{'+ allocator overhead ' + format(cal.allocator_overhead, '.0%'):<{width}}"
              f"{p.peak_bytes * cal.allocator_overhead / GIB:>9.2f}",
              f"{'+ CUDA context (not in max_memory_allocated)':<{width}}{cal.cuda_context_gib:>9.2f}",
              f"{'needed per GPU':<{width}}{p.needed_bytes / GIB:>9.2f}", "",
              "phases (GiB allocated): " + ", ".join(f"{ph.name} {p.total(ph) / GIB:.2f}" for ph in p.phases),
              f"verdict: {p.verdict()}"]
    lines += [f"note: {a}" for a in p.assumptions]
    return "\n".join(lines)


def _expand(arguments: Sequence[str]) -> List[List[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    return BasicSweeper.split_arguments(parsed, None)[0]


def sweep_table(combos: Sequence[Sequence[str]], keys: Sequence[str],
                device: Optional[str] = None) -> Tuple[str, List[Dict[str, Any]]]:
    from trainer.compose import compose_all

    rows = []
    for overrides, cfg in zip(combos, compose_all(combos)):
        p = predict(cfg, device=device)
        choice = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] in keys}
        rows.append({"choice": choice, "known": p.known, "peak_gib": p.peak_bytes / GIB if p.known else None,
                     "needed_gib": p.needed_bytes / GIB if p.known else None, "fits": p.fits,
                     "phase": p.peak_phase.name if p.peak_phase else "", "target_gib": p.target_gib,
                     "checkpointed": p.checkpointed})
    header = "| " + " | ".join(keys) + " | peak allocated GiB | needed GiB | peak at | fits |"
    lines = [header, "|" + "---|" * (len(keys) + 4)]
    for row in rows:
        fits = {True: "yes", False: "NO", None: "-"}[row["fits"]]
        peak = f"{row['peak_gib']:.2f}" if row["known"] else "unknown"
        needed = f"{row['needed_gib']:.2f}" if row["known"] else "unknown"
        lines.append("| " + " | ".join(row["choice"].get(k, "") for k in keys) + f" | {peak} | {needed} | "
                     f"{row['phase']} | {fits} |")
    return "\n".join(lines), rows


def sweep_png(rows: List[Dict[str, Any]], keys: Sequence[str], path: Path) -> Path:
    """Needed GiB against the first swept key, one line per value of the others; the GPU's memory dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, rest = keys[0], list(keys[1:])
    series: Dict[str, List[Tuple[str, float]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={row['choice'].get(k, '')}" for k in rest) or "needed"
        series.setdefault(label, []).append((row["choice"].get(first, ""), row["needed_gib"] or float("nan")))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ticks = list(dict.fromkeys(row["choice"].get(first, "") for row in rows))
    for label, points in series.items():
        ax.plot([ticks.index(v) for v, _ in points], [g for _, g in points], "o-", label=label)
    target = next((row["target_gib"] for row in rows if row["target_gib"]), None)
    if target:
        ax.axhline(target, color="tab:red", linestyle="--", label=f"GPU {target:g} GiB")
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(first)
    ax.set_ylabel("needed per GPU (GiB)")
    ax.set_title("qforge predicted peak memory per GPU", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="overrides with comma lists span a grid")
    parser.add_argument("--png", default="memory_sweep.png", help="where --sweep writes its plot")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="predict a GPU run (default, bf16 where supported) or a CPU one (fp32)")
    parser.add_argument("overrides", nargs="*", help="the same overrides as python train.py takes")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if args.sweep:
            combos = _expand(args.overrides)
            values: Dict[str, set] = {}
            for combo in combos:
                for override in combo:
                    key, _, value = override.partition("=")
                    values.setdefault(key, set()).add(value)
            keys = [k for k, v in values.items() if len(v) > 1] or list(values)[:1]
            table, rows = sweep_table(combos, keys, args.device)
            print(table)
            if rows and keys:
                print(f"plot: {sweep_png(rows, keys, Path(args.png))}")
            return 0
        from trainer.compose import compose

        p = predict(compose(args.overrides), device=args.device)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {str(err).strip().splitlines()[0]} Fix: check the overrides (python train.py --cfg job).",
              file=sys.stderr)
        return 1
    print(render(p))
    return 2 if p.fits is False else 0


if __name__ == "__main__":
    raise SystemExit(main())

