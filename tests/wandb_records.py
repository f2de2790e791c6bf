"""Reads a wandb offline run file (run-<id>.wandb) so tests can check what was logged.

The file is wandb's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then
32 KiB blocks of records, each with a 7-byte header (crc32, length, type) holding protobuf
`Record` messages, split across blocks as FULL / FIRST / MIDDLE / LAST pieces.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[object]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a wandb run file"
    offset, pending = HEADER.size, b""
    while offset + RECORD.size <= len(data):
        room = BLOCK - offset % BLOCK
        if room < RECORD.size:  # the tail of a block too small for a header is padding
            offset += room
            continue
        _, length, kind = RECORD.unpack_from(data, offset)
        offset += RECORD.size
        piece, offset = data[offset:offset + length], offset + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = piece
        else:
            pending += piece
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def item_key(item: object) -> str:
    """An update/history item's key: `key`, or `nested_key` parts joined with dots (newer wandb)."""
    return item.key or ".".join(item.nested_key)  # type: ignore[attr-defined]
