"""Run time: from the plan's data spec and the tokenizer to what the Trainer trains on.

    training_data(spec, tokenizer, rank, world_size) -> (train dataset, eval dataset or None, collator)

Rank 0 tokenizes once per cache key (trainer/data/cache.py) with data.num_proc workers and a progress bar:
each source is opened through `datasets`, split (eval held out), sampled to its weight, rendered with the
template, tokenized, and the lengths packed; the result is an Arrow table plus index and bin arrays. Every
rank then memory-maps the same entry. A second run with the same key starts without tokenizing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from trainer.data import cache, sources, templates
from trainer.data.examples import Example, ExampleDataset, PadCollator
from trainer.data.mixture import sample, split_indices, train_counts
from trainer.data.tokenize import Encoder, encode_one, features
from trainer.errors import UserError

log = logging.getLogger(__name__)

MAP_BATCH = 1000


@dataclass
class Prepared:
    """A complete cache entry, memory-mapped: the token table, which rows train and eval, packed bins."""

    path: Path
    meta: Dict[str, Any]
    table: Any
    lengths: Any
    train_index: Any
    eval_index: Any
    built_here: bool

    def bins(self, split: str) -> Optional[Tuple[Any, Any]]:
        flat, offsets = self.path / f"{split}_bins.npy", self.path / f"{split}_bin_offsets.npy"
        if not flat.is_file():
            return None
        import numpy as np

        return np.load(flat, mmap_mode="r"), np.load(offsets, mmap_mode="r")


def training_data(spec: Dict[str, Any], tokenizer: Any, rank: int = 0, world_size: int = 1) -> Tuple[Any, Any, Any]:
    """(train dataset, eval dataset or None, collator): packed rows when spec.packing, padded examples otherwise."""
    from trainer.packing import PackedCollator, PackedDataset

    collator = PackedCollator(tokenizer.pad_token_id, flatten=spec["flatten_packed_batches"]) if spec["packing"] \
        else PadCollator(tokenizer.pad_token_id)
    if spec["streaming"]:
        return streaming_dataset(spec, tokenizer), None, collator
    data = prepare(spec, tokenizer, rank, world_size)
    from trainer.data.sets import TokenizedRows

    log.info("data: %d train / %d eval examples (cache %s)", len(data.train_index), len(data.eval_index), data.path)

    train_rows = TokenizedRows(data.table, data.train_index, data.lengths)
    eval_rows = TokenizedRows(data.table, data.eval_index, data.lengths) if len(data.eval_index) else None
    if not spec["packing"]:
        train_set: Any = ExampleDataset(train_rows)
        eval_set: Any = ExampleDataset(eval_rows) if eval_rows is not None else None
    else:
        capacity = spec["max_seq_len"]
        train_set = PackedDataset(train_rows, capacity, bins=data.bins("train"))
        eval_set = PackedDataset(eval_rows, capacity, bins=data.bins("eval")) if eval_rows is not None else None
        log.info("packing: %d train examples in %d rows of <= %d tokens", len(train_rows), len(train_set), capacity)
    train_set.prepared = data  # where the rows came from: run.record_data writes it down per rank
    return train_set, eval_set, collator


def prepare(spec: Dict[str, Any], tokenizer: Any, rank: int = 0, world_size: int = 1) -> Prepared:
    """Find or build (rank 0; others wait) the cache entry for this spec and tokenizer, and memory-map it."""
    for source in spec["sources"]:
        sources.check_exists(source)
    template = templates.resolve(spec["template"], tokenizer, chat_data=_has_chat_data(spec))
    key = cache.cache_key(spec, tokenizer, template.text)
    built_here = False
    target = cache.entry(spec, key)
    if not cache.is_complete(target) and rank == 0:
        log.info("data: tokenizing into %s (template %s, assistant turns from %s)", target, template.name,
                 template.mask_source)
        built_here = True
    path = cache.build_once(spec, key, lambda scratch: _build(spec, tokenizer, template, scratch), rank, world_size)
    data = load(path)
    data.built_here = built_here
    if not built_here:
        log.info("data: found the tokenized cache, no tokenizing")
    return data


def load(path: Path) -> Prepared:
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    meta = cache.read_meta(path)
    parts = [Dataset.from_file(str(path / name)) for name in meta["shards"]]
    table = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    table = table.select_columns(["input_ids", "labels"])
    return Prepared(path=path, meta=meta, table=table, lengths=np.load(path / "lengths.npy", mmap_mode="r"),
                    train_index=np.load(path / "train_index.npy", mmap_mode="r"),
                    eval_index=np.load(path / "eval_index.npy", mmap_mode="r"), built_here=False)


def _has_chat_data(spec: Dict[str, Any]) -> bool:
    return any(s["format"] == "sharegpt" for s in spec["sources"])


def _workers(spec: Dict[str, Any]) -> int:
    """data.num_proc processes for datasets.map; null: this process, the tokenizer's own threads on every core.

    One process with the tokenizer's (Rust) thread pool measured ~2x faster than single-threaded on 2 cores,
    with no copies of the tokenizer and template in workers; N processes (each single-threaded) are for
    machines where the Python side (rendering a large template) and not tokenizing is the bottleneck.
    """
    if spec.get("num_proc") and int(spec["num_proc"]) > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker tokenizes on its own core
        return int(spec["num_proc"])
    # Set explicitly: tokenizers then also stays quiet when something forks after it used its threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return 1


def _build(spec: Dict[str, Any], tokenizer: Any, template: templates.Template, scratch: Path) -> Dict[str, Any]:
    """Tokenize every row the mixture uses (each once), then the index and bin arrays. Returns meta.json's body."""
    import numpy as np

    rng = np.random.default_rng(spec["split_seed"])
    raw_cache = str(Path(spec["cache_dir"]) / "raw")
    opened, splits = [], []
    for source in spec["sources"]:
        dataset = sources.load(source, raw_cache)
        used = min(len(dataset), source["max_samples"]) if source["max_samples"] else len(dataset)
        opened.append((dataset, used))
        splits.append(split_indices(used, spec["eval_fraction"], rng))
    train_parts = [s[0] for s in splits]
    n_eval = sum(len(s[1]) for s in splits)
    label = sources.label(spec["sources"][0]) if len(spec["sources"]) == 1 else "the data mixture"
    total = sum(used for _, used in opened)
    if spec["eval_fraction"] > 0 and n_eval == 0:
        raise UserError(f"{label} has {total} examples, too few to hold out data.eval_fraction="
                        f"{spec['eval_fraction']} for eval; add data or set do_eval=false.")
    if sum(len(p) for p in train_parts) == 0:
        raise UserError(f"{label}: holding out {n_eval} of {total} examples leaves none to train on; "
                        "lower data.eval_fraction.")
    counts = train_counts([len(p) for p in train_parts], [s["weight"] for s in spec["sources"]])
    picks = [sample(part, count, rng) for part, count in zip(train_parts, counts)]

    num_proc = _workers(spec)
    shards: List[str] = []
    train_index, eval_index, lengths, per_source = [], [], [], []
    base = 0
    for number, (source, (dataset, used), pick, (_, held_out)) in enumerate(
            zip(spec["sources"], opened, picks, splits)):
        rows = np.unique(np.concatenate([pick, held_out]))
        contiguous = len(rows) == used
        subset = dataset.select(range(used)) if contiguous else dataset.select(rows)
        encoder = Encoder(tokenizer, template, source["format"], source["columns"], spec["max_seq_len"],
                          sources.label(source))
        tokens = subset.map(
            _Numbered(encoder, None if contiguous else rows), batched=True, batch_size=MAP_BATCH, with_indices=True,
            remove_columns=subset.column_names, features=features(), num_proc=num_proc if 1 < num_proc <= len(rows)
            else None, cache_file_name=str(scratch / f"tokens-{number}.arrow"), load_from_cache_file=False,
            writer_batch_size=MAP_BATCH, desc=f"tokenizing {Path(source['path']).name}")
        shards += [os.path.relpath(f["filename"], scratch) for f in tokens.cache_files]
        length = np.asarray(tokens.data.column("length").to_numpy(), dtype=np.int32)
        trained = np.asarray(tokens.data.column("trained").to_numpy(), dtype=np.int32)
        position = base + np.searchsorted(rows, pick)
        held = base + np.searchsorted(rows, held_out)
        usable = trained > 0
        train_index.append(position[usable[position - base]])
        eval_index.append(held[usable[held - base]])
        lengths.append(length)
        per_source.append({"source": source["path"], "weight": source["weight"], "records": len(dataset),
                           "used": used, "tokenized": len(rows), "train": int(len(train_index[-1])),
                           "eval": int(len(eval_index[-1])), "cut_off": int((~usable).sum()),
                           "tokens": int(length.sum())})
        base += len(rows)
    train = np.concatenate(train_index).astype(np.int64)
    evals = np.concatenate(eval_index).astype(np.int64)
    all_lengths = np.concatenate(lengths)
    if len(train) == 0:
        raise UserError(f"{label}: every example's response was cut off by train.max_seq_len="
                        f"{spec['max_seq_len']}; raise it.")
    np.save(scratch / "lengths.npy", all_lengths)
    np.save(scratch / "train_index.npy", train)
    np.save(scratch / "eval_index.npy", evals)
    if spec["packing"]:
        _save_bins(scratch, "train", train, all_lengths, spec)
        _save_bins(scratch, "eval", evals, all_lengths, spec)
    log.info("data: %d train / %d eval examples, %d tokens tokenized", len(train), len(evals),
             int(all_lengths.sum()))
    return {"format_version": spec["format_version"], "fingerprint": spec["fingerprint"], "shards": shards,
            "template": template.name, "eot": template.eot, "mask_source": template.mask_source,
            "num_proc": num_proc, "train_examples": int(len(train)), "eval_examples": int(len(evals)),
            "sources": per_source}


def _save_bins(scratch: Path, split: str, index: Any, lengths: Any, spec: Dict[str, Any]) -> None:
    import numpy as np

    from trainer.packing import pack_lengths

    flat, offsets = pack_lengths(lengths[index], spec["max_seq_len"], seed=spec["split_seed"])
    np.save(scratch / f"{split}_bins.npy", flat)
    np.save(scratch / f"{split}_bin_offsets.npy", offsets)


class _Numbered:
    """Encoder call with record numbers of the source (not of the selected subset) for error messages."""

    def __init__(self, encoder: Encoder, rows: Any):
        self.encoder = encoder
        self.rows = rows

    def __call__(self, batch: Dict[str, List[Any]], indices: List[int]) -> Any:
        numbers = indices if self.rows is None else [int(self.rows[i]) for i in indices]
        return self.encoder(batch, numbers)


def examples(spec: Dict[str, Any], tokenizer: Any) -> Tuple[List[Example], List[Example]]:
    """The (train, eval) examples of a small data set as lists (tests, bench); cached like a run's."""
    data = prepare(spec, tokenizer)

    def materialize(index: Any) -> List[Example]:
        out = []
        for start in range(0, len(index), MAP_BATCH):
            batch = data.table[[int(i) for i in index[start:start + MAP_BATCH]]]
            out += [Example(list(ids), list(labels)) for ids, labels in zip(batch["input_ids"], batch["labels"])]
        return out

    return materialize(data.train_index), materialize(data.eval_index)


def streaming_dataset(spec: Dict[str, Any], tokenizer: Any) -> Any:
    """Sources read lazily, interleaved by weight (seeded), tokenized on the fly; packed in windows."""
    from trainer.data.sets import StreamingExamples

    template = templates.resolve(spec["template"], tokenizer, chat_data=_has_chat_data(spec))
    raw_cache = str(Path(spec["cache_dir"]) / "raw")
    weights = [s["weight"] for s in spec["sources"]]
    probabilities = [w / sum(weights) for w in weights]
    encoders = [Encoder(tokenizer, template, s["format"], s["columns"], spec["max_seq_len"], sources.label(s))
                for s in spec["sources"]]
    streams = [sources.load(s, raw_cache, streaming=True) for s in spec["sources"]]

    def make_stream(epoch: int) -> Any:
        import numpy as np

        rng = np.random.default_rng([spec["split_seed"], epoch])
        iterators = [iter(_capped(stream, s["max_samples"])) for stream, s in zip(streams, spec["sources"])]
        counters = [0] * len(iterators)
        alive = list(range(len(iterators)))
        while alive:
            p = np.array([probabilities[i] for i in alive])
            choice = alive[int(rng.choice(len(alive), p=p / p.sum()))] if len(alive) > 1 else alive[0]
            try:
                record = next(iterators[choice])
            except StopIteration:
                alive.remove(choice)
                continue
            example = encode_one(encoders[choice], record, counters[choice])
            counters[choice] += 1
            if example is not None:
                yield example

    return StreamingExamples(make_stream, spec["max_seq_len"], spec["packing"], spec["split_seed"])


def _capped(stream: Any, cap: Optional[int]) -> Any:
    import itertools

    return itertools.islice(stream, cap) if cap else stream
