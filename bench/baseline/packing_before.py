"""qforge's packing before issue 13 (commit 2a61a54 trainer/packing.py), kept verbatim for bench/data_bench.py."""


from __future__ import annotations

import bisect
import random
from typing import Any, Dict, Iterator, List, Sequence

from bench.baseline.data_before import IGNORE_INDEX, Example

# Attention implementations that take one flattened row with restarting position ids (varlen kernels).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def pack(examples: Sequence[Example], capacity: int, seed: int = 0) -> List[List[Example]]:
    """Group examples into bins of at most `capacity` tokens; the bins come back in a seeded random order.

    Best-fit decreasing fills bins to ~99% on instruction-like length mixes; the Trainer's sampler
    shuffles the bins again each epoch, so the sort does not order training.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
    bins: List[List[Example]] = []
    free: List[tuple] = []  # (tokens left, bin index), sorted: bisect finds the tightest bin that fits
    for i in order:
        length = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            left, index = free.pop(at)
        else:
            bins.append([])
            left, index = capacity, len(bins) - 1
        bins[index].append(examples[i])
        if left - length > 0:
            bisect.insort(free, (left - length, index))
    random.Random(seed).shuffle(bins)
    return bins


def row(examples: Sequence[Example]) -> Dict[str, List[int]]:
    """One packed row: concatenated ids, labels with each example's first label ignored, restarting positions."""
    input_ids: List[int] = []
    labels: List[int] = []
    positions: List[int] = []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + list(example.labels[1:])
        positions += list(range(len(example.input_ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


class PackedDataset:
    """Map-style dataset of packed rows (what the HF Trainer's sampler shuffles and batches)."""

    def __init__(self, examples: Sequence[Example], capacity: int, seed: int = 0):
        self.bins = pack(examples, capacity, seed)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return row(self.bins[index])

    def __iter__(self) -> Iterator[Dict[str, List[int]]]:
        return (self[i] for i in range(len(self)))

    def token_count(self) -> int:
        return sum(len(e.input_ids) for b in self.bins for e in b)


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
