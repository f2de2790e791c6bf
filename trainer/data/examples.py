"""Tokenized examples and the padding collator (packed rows are in trainer/packing.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: List[int]
    labels: List[int]


class ExampleDataset:
    """A map-style dataset over tokenized examples (what the HF Trainer's sampler needs)."""

    def __init__(self, examples: Any):
        # A list of Example, or a TokenizedRows view of the memory-mapped cache (trainer/data/sets.py).
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        example = self.examples[index]
        if isinstance(example, Example):
            return {"input_ids": example.input_ids, "labels": example.labels}
        return example

    def __iter__(self) -> Iterator[Dict[str, List[int]]]:
        return (self[i] for i in range(len(self)))

    def token_count(self) -> int:
        lengths = getattr(self.examples, "lengths", None)
        if lengths is not None:
            return int(lengths.sum())
        return sum(len(e.input_ids) for e in self.examples)


class PadCollator:
    """Pads a batch to its longest example; padding is masked from attention and loss."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: List[Dict[str, List[int]]]) -> Dict[str, Any]:
        import torch

        longest = max(len(item["input_ids"]) for item in batch)
        width = -(-longest // self.multiple) * self.multiple
        input_ids, labels, attention = [], [], []
        for item in batch:
            pad = width - len(item["input_ids"])
            input_ids.append(list(item["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(item["labels"]) + [IGNORE_INDEX] * pad)
            attention.append([1] * len(item["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }
