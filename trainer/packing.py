"""Padding-free packing: many short examples share one row, and attention never crosses them.

Examples are packed into rows of at most `train.max_seq_len` tokens (largest item first, then the largest
that still fits, which fills rows like best-fit decreasing), so a batch of `train.batch_size` rows holds as
many tokens as a full batch of long examples instead of being mostly padding. Each row carries
`position_ids` that restart at 0 for every example and no attention mask: transformers then builds a
block-diagonal causal mask from the position ids (sdpa, eager) or uses the variable-length kernel (flash
attention), so an example never attends to its neighbours. The first label of every example is ignored, so
the last token of one example is never trained to predict the first token of the next. The loss is the mean
over the same label tokens as with padding. (transformers only reads packed position ids when no KV cache is
in use: model.load_model sets use_cache=False.)

Packing works on lengths alone (pack_lengths): the tokenized cache's lengths column is packed once per
fingerprint and the bins are stored beside it, so a million examples never become Python objects.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from trainer.data.examples import IGNORE_INDEX, Example
from trainer.data.spec import VARLEN_ATTENTION

__all__ = ["VARLEN_ATTENTION", "pack_lengths", "pack", "row", "PackedDataset", "PackedCollator"]


def pack_lengths(lengths: Sequence[int], capacity: int, seed: int = 0) -> Tuple[Any, Any]:
    """Bins of at most `capacity` tokens as (flat item positions, bin offsets), bins in a seeded random order.

    Each bin takes the longest item left, then repeatedly the longest that still fits. Items of equal length
    go in index order, so the result depends only on the lengths and the seed. The Trainer's sampler shuffles
    the bins again each epoch, so the sort does not order training.
    """
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")  # ascending; equal lengths keep index order
    sorted_lengths = lengths[order]
    distinct, starts, counts = np.unique(sorted_lengths, return_index=True, return_counts=True)
    available = [int(x) for x in distinct]  # ascending lengths that still have items
    next_item = {int(v): int(s) for v, s in zip(distinct, starts)}
    end_item = {int(v): int(s + c) for v, s, c in zip(distinct, starts, counts)}
    order_list = order.tolist()

    def take(length: int, at: int) -> int:
        position = next_item[length]
        next_item[length] = position + 1
        if position + 1 == end_item[length]:
            del available[at]
        return order_list[position]

    bins: List[List[int]] = []
    while available:
        first = available[-1]
        members = [take(first, len(available) - 1)]
        space = capacity - first
        while space > 0 and available:
            at = bisect.bisect_right(available, space) - 1
            if at < 0:
                break
            length = available[at]
            members.append(take(length, at))
            space -= length
        bins.append(members)
    random.Random(seed).shuffle(bins)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bins], out=offsets[1:])
    flat = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def pack(examples: Sequence[Example], capacity: int, seed: int = 0) -> List[List[Example]]:
    """Group examples into bins of at most `capacity` tokens (pack_lengths over their lengths)."""
    flat, offsets = pack_lengths([len(e.input_ids) for e in examples], capacity, seed)
    return [[examples[int(i)] for i in flat[offsets[b]:offsets[b + 1]]] for b in range(len(offsets) - 1)]


def _ids(example: Any) -> Tuple[Sequence[int], Sequence[int]]:
    if isinstance(example, Example):
        return example.input_ids, example.labels
    return example["input_ids"], example["labels"]


def row(examples: Sequence[Any]) -> Dict[str, List[int]]:
    """One packed row: concatenated ids, labels with each example's first label ignored, restarting positions."""
    input_ids: List[int] = []
    labels: List[int] = []
    positions: List[int] = []
    for example in examples:
        ids, example_labels = _ids(example)
        input_ids += list(ids)
        labels += [IGNORE_INDEX] + list(example_labels[1:])
        positions += list(range(len(ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


class PackedDataset:
    """Map-style dataset of packed rows (what the HF Trainer's sampler shuffles and batches).

    `examples` is a list of Example, or a TokenizedRows view of the cache (trainer/data/sets.py), which
    fetches a bin's examples in one read. `bins` (flat positions, offsets) skips packing when it was cached.
    """

    def __init__(self, examples: Any, capacity: int, seed: int = 0, bins: Optional[Tuple[Any, Any]] = None):
        self.examples = examples
        lengths = getattr(examples, "lengths", None)
        if bins is None:
            bins = pack_lengths(lengths if lengths is not None else [len(_ids(e)[0]) for e in examples],
                                capacity, seed)
        self.flat, self.offsets = bins

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def members(self, index: int) -> List[int]:
        return [int(i) for i in self.flat[self.offsets[index]:self.offsets[index + 1]]]

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        positions = self.members(index)
        fetch = getattr(self.examples, "rows", None)
        return row(fetch(positions) if fetch is not None else [self.examples[i] for i in positions])

    def __iter__(self) -> Iterator[Dict[str, List[int]]]:
        return (self[i] for i in range(len(self)))

    def token_count(self) -> int:
        lengths = getattr(self.examples, "lengths", None)
        if lengths is not None:
            return int(lengths[self.flat].sum())
        return sum(len(_ids(self.examples[int(i)])[0]) for i in self.flat)


class PackedCollator:
    """Stacks packed rows into a batch with position ids and no attention mask.

    With a varlen attention kernel every row goes into one flattened row (no padding at all). Otherwise
    rows are padded to the longest; the padding is its own "example" (positions restart at 0, labels
    ignored), so real tokens never attend to it, and a batch of full rows has no padding and keeps the
    plain causal fast path.
    """

    def __init__(self, pad_token_id: int, flatten: bool = False, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.flatten = flatten
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: List[Dict[str, List[int]]]) -> Dict[str, Any]:
        import torch

        if self.flatten:
            batch = [{key: [v for item in batch for v in item[key]] for key in ("input_ids", "labels", "position_ids")}]
        longest = max(len(item["input_ids"]) for item in batch)
        width = longest if self.flatten else -(-longest // self.multiple) * self.multiple
        input_ids, labels, positions = [], [], []
        for item in batch:
            pad = width - len(item["input_ids"])
            input_ids.append(item["input_ids"] + [self.pad_token_id] * pad)
            labels.append(item["labels"] + [IGNORE_INDEX] * pad)
            positions.append(item["position_ids"] + list(range(pad)))
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
        }
