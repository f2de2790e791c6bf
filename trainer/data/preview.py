"""Look before training: the first examples as the model will see them, trained spans marked, and lengths.

    python -m trainer.data preview [overrides ...] [--examples N] [--records M]

Composes and validates like train.py, reads only the first records of each source (streamed, nothing is
cached), renders them with the run's template and prints each example with its trained tokens between
[[ and ]] (green on a terminal), its token counts, and a histogram of the token lengths of the first M
records of every source.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from typing import Any, Dict, List, Sequence, TextIO

from trainer.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["preview"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (data=mix ...)")
    parser.add_argument("--examples", "-n", type=int, default=3, help="examples to print (default 3)")
    parser.add_argument("--records", type=int, default=1000,
                        help="records per source in the length histogram (default 1000)")
    args = parser.parse_intermixed_args(argv)
    from trainer.entry import configure_logging

    configure_logging()
    try:
        return preview(args.overrides, args.examples, args.records, sys.stdout)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def preview(overrides: Sequence[str], n_examples: int, n_records: int, out: TextIO) -> int:
    from trainer.compose import compose
    from trainer.data import sources, templates
    from trainer.data.tokenize import Encoder
    from trainer.validate import validate

    cfg = compose(overrides)
    report = validate(cfg)
    report.print()
    if not report.ok:
        print(f"qforge: {len(report.errors)} rule(s) reject this composition.", file=sys.stderr)
        return 2
    from trainer.plan import build_plan

    plan = build_plan(cfg)
    spec = plan.data
    tokenizer = _tokenizer(plan.model)
    template = templates.resolve(spec["template"], tokenizer, chat_data=any(s["format"] == "sharegpt"
                                                                            for s in spec["sources"]))
    print(f"template: {template.name}; trained spans from {template.mask_source}; end of turn: "
          f"{template.eot or 'none'}; max_seq_len {spec['max_seq_len']}", file=out)
    for s in spec["sources"]:
        planned = f", planned {s['planned_train_examples']} train / {s['planned_eval_examples']} eval" \
            if "planned_train_examples" in s else ""
        records = s["records"] if s["records"] is not None else "unknown until read"
        print(f"source {s['path']} ({s['kind']}, {s['format']}, split {s['split']}): weight {s['weight']:g}, "
              f"{records} records{planned}", file=out)
    encoders, heads = [], []
    with tempfile.TemporaryDirectory() as scratch:  # streamed: datasets leaves only lock files, here
        for source in spec["sources"]:
            encoders.append(Encoder(tokenizer, template, source["format"], source["columns"], spec["max_seq_len"],
                                    sources.label(source)))
            stream = sources.load(source, scratch, streaming=True)
            heads.append(list(itertools.islice(iter(stream), max(n_records, n_examples))))
    color = out.isatty()
    shown = 0
    for index in range(max(len(h) for h in heads)):
        for encoder, head in zip(encoders, heads):
            if shown >= n_examples or index >= len(head):
                continue
            ids, spans = encoder.encode_records([head[index]], [index])[0]
            trained = sum(b - a for a, b in spans)
            print(f"\n--- {encoder.where(index)}: {len(ids)} tokens, {trained} trained ---", file=out)
            print(marked(tokenizer, ids, spans, color), file=out)
            shown += 1
    lengths = []
    for encoder, head in zip(encoders, heads):
        for start in range(0, len(head[:n_records]), 256):
            batch = head[start:min(start + 256, n_records)]
            lengths += [len(ids) for ids, _ in encoder.encode_records(batch, range(start, start + len(batch)))]
    print("", file=out)
    print(histogram(lengths, spec["max_seq_len"]), file=out)
    return 0


def _tokenizer(model: Any) -> Any:
    """The run's tokenizer, without building or loading a model (the embedded model's is the shipped one)."""
    import dataclasses

    from trainer.model import load_tokenizer
    from trainer.tiny import TOKENIZER_DIR

    if model.tiny is not None:
        model = dataclasses.replace(model, source=str(TOKENIZER_DIR), tiny=None)
    return load_tokenizer(model)


def marked(tokenizer: Any, ids: List[int], spans: List[tuple], color: bool) -> str:
    """The example's text with trained runs between [[ ]] (or in green on a terminal)."""
    flags = [False] * len(ids)
    for a, b in spans:
        flags[a:b] = [True] * (b - a)
    parts = []
    for trained, run in itertools.groupby(zip(ids, flags), key=lambda x: x[1]):
        text = tokenizer.decode([i for i, _ in run])
        if trained:
            text = f"\033[32m{text}\033[0m" if color else f"[[{text}]]"
        parts.append(text)
    return "".join(parts)


def histogram(lengths: List[int], max_len: int, bins: int = 10, width: int = 40) -> str:
    if not lengths:
        return "no records"
    import statistics

    low, top = min(lengths), max(lengths)
    step = max(1, -(-(top - low + 1) // bins))
    counts: Dict[int, int] = {}
    for n in lengths:
        b = min((n - low) // step, bins - 1)
        counts[b] = counts.get(b, 0) + 1
    most = max(counts.values())
    at_cap = sum(n >= max_len for n in lengths)
    lines = [f"token lengths of {len(lengths)} records: min {min(lengths)}, median {statistics.median(lengths):g}, "
             f"mean {statistics.mean(lengths):.1f}, max {top}; {at_cap} cut at max_seq_len={max_len}"]
    for b in range(bins):
        if low + b * step > top:
            break
        c = counts.get(b, 0)
        lines.append(f"{low + b * step:>7}-{low + (b + 1) * step - 1:<7} {'#' * round(width * c / most):<{width}} {c}")
    return "\n".join(lines)
