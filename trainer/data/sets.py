"""What the Trainer iterates: views of the memory-mapped token cache, and the streaming dataset."""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterator, List, Sequence

from torch.utils.data import IterableDataset


class TokenizedRows:
    """Rows `index` of the cached token table (memory-mapped Arrow): indexable, with their lengths.

    Rows are read on demand; nothing is held in Python lists but the rows of one batch.
    """

    def __init__(self, table: Any, index: Any, all_lengths: Any):
        self.table = table  # a datasets.Dataset over the cache's Arrow files, columns input_ids and labels
        self.index = index
        self.lengths = all_lengths[index] if len(index) else all_lengths[:0]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.table[int(self.index[i])]

    def rows(self, positions: Sequence[int]) -> List[Dict[str, List[int]]]:
        batch = self.table[[int(self.index[p]) for p in positions]]
        return [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"])]


class StreamingExamples(IterableDataset):
    """An iterable dataset for data larger than RAM: records are read, rendered and tokenized on the fly.

    The order is fixed by data.split_seed (sources interleaved by weight), so a resumed run that skips the
    batches it already trained on sees exactly the samples an uninterrupted run would next. With packing,
    examples are packed in windows of `window` examples (pack_lengths) as they stream by.
    """

    def __init__(self, make_stream: Any, capacity: int, packing: bool, seed: int, window: int = 512):
        self.make_stream = make_stream  # () -> iterator of {"input_ids", "labels"}
        self.capacity = capacity
        self.packing = packing
        self.seed = seed
        self.window = window

    def __iter__(self) -> Iterator[Dict[str, List[int]]]:
        from trainer.packing import pack_lengths, row

        for epoch in itertools.count():  # a stream restarts when it ends: train.max_steps bounds the run
            stream = self.make_stream(epoch)
            produced = False
            if not self.packing:
                for example in stream:
                    produced = True
                    yield example
            else:
                while True:
                    window = list(itertools.islice(stream, self.window))
                    if not window:
                        break
                    produced = True
                    flat, offsets = pack_lengths([len(e["input_ids"]) for e in window], self.capacity,
                                                 self.seed + epoch)
                    for b in range(len(offsets) - 1):
                        yield row([window[int(i)] for i in flat[offsets[b]:offsets[b + 1]]])
            if not produced:
                return
