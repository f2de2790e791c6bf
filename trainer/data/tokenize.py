"""Records to token ids and labels, a batch at a time (what datasets.map runs in each worker).

A row of the tokenized table is `input_ids` and `labels` (int32, IGNORE_INDEX outside the trained spans),
`length` and `trained` (how many labels are learned). The output is built as Arrow arrays from flat numpy
buffers: no per-token Python objects, so a million records stream through in bounded memory.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from trainer.data import records, templates
from trainer.data.examples import IGNORE_INDEX

Span = Tuple[int, int]


class Encoder:
    """Everything one source's rows need to become tokens: its format, columns, the template and tokenizer.

    Picklable (datasets.map sends it to worker processes); the Jinja template compiles in each worker.
    """

    def __init__(self, tokenizer: Any, template: templates.Template, fmt: str, columns: Dict[str, str],
                 max_len: int, label: str):
        self.tokenizer = tokenizer
        self.template = template
        self.fmt = fmt
        self.columns = dict(columns)
        self.max_len = max_len
        self.label = label  # names the source in error messages: "<path> record <n>"

    def where(self, index: int) -> str:
        return f"{self.label} record {index + 1}"

    def encode_records(self, rows: Sequence[Dict[str, Any]], indices: Sequence[int]) -> List[Tuple[List[int],
                                                                                                  List[Span]]]:
        where = [self.where(i) for i in indices]
        if self.template.is_alpaca:
            turns = [records.to_turns(r, self.fmt, self.columns, w) for r, w in zip(rows, where)]
            return templates.encode_turns(self.tokenizer, turns, self.max_len)
        conversations = [records.to_messages(r, self.fmt, self.columns, w) for r, w in zip(rows, where)]
        rendered = templates.render(self.template, conversations, where)
        return templates.encode(self.template, self.tokenizer, rendered, self.max_len)

    def __call__(self, batch: Dict[str, List[Any]], indices: Sequence[int]) -> Any:
        """datasets.map(batched=True, with_indices=True): a dict of columns in, an Arrow table out."""
        names = list(batch)
        rows = [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
        return to_table(self.encode_records(rows, indices))


def to_table(encoded: Sequence[Tuple[List[int], List[Span]]]) -> Any:
    import itertools

    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(ids) for ids, _ in encoded), dtype=np.int32, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(e[0] for e in encoded), dtype=np.int32, count=total)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int32)
    trained = np.zeros(len(encoded), dtype=np.int32)
    for row, (_, spans) in enumerate(encoded):
        base = int(offsets[row])
        for start, end in spans:
            labels[base + start: base + end] = ids[base + start: base + end]
            trained[row] += max(0, end - start)
    offsets_array = pa.array(offsets, type=pa.int32())
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets_array, pa.array(ids, type=pa.int32())),
        "labels": pa.ListArray.from_arrays(offsets_array, pa.array(labels, type=pa.int32())),
        "length": pa.array(lengths, type=pa.int32()),
        "trained": pa.array(trained, type=pa.int32()),
    })


def features() -> Any:
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "trained": Value("int32")})


def encode_one(encoder: Encoder, record: Dict[str, Any], index: int) -> Optional[Dict[str, List[int]]]:
    """One record as {"input_ids", "labels"} (streaming, preview); None when nothing in it is trained."""
    ids, spans = encoder.encode_records([record], [index])[0]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": list(ids), "labels": labels}
