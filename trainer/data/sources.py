"""Run time: open a source of the data spec through the `datasets` library (memory-mapped Arrow).

A source is a local file (jsonl/json, parquet, csv, arrow), a directory written by `Dataset.save_to_disk`,
or a hub dataset id read from the local Hugging Face datasets cache. qforge never downloads: a hub id is
looked up with the hub switched off, and a missing one is one sentence with the command that fetches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Iterator, List

from trainer.data.records import first_bad_json_line
from trainer.data.spec import FIELDS, datasets_cache_root, hub_cache_entry
from trainer.errors import UserError

log = logging.getLogger(__name__)


def label(source: Dict[str, Any]) -> str:
    return source["path"] if source["kind"] != "hub" else f"hub dataset {source['path']}"


def load(source: Dict[str, Any], raw_cache: str, streaming: bool = False) -> Any:
    """The source's split as a datasets.Dataset (or IterableDataset when streaming), columns checked."""
    _quiet_datasets()
    kind = source["kind"]
    if kind == "file":
        dataset = _load_file(source, raw_cache, streaming)
    elif kind == "saved":
        dataset = _load_saved(source, streaming)
    else:
        dataset = _load_hub(source, streaming)
    check_columns(source, dataset)
    return dataset


def check_exists(source: Dict[str, Any]) -> None:
    """Before anything is created: a source that is not there is one sentence naming the key to fix."""
    path = source["path"]
    if source["kind"] == "file" and not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist; set {source['where']}.path to an existing file (jsonl, "
                        "json, parquet, csv, arrow), a save_to_disk directory or a hub dataset id in the local cache.")
    if source["kind"] == "saved" and not os.path.isdir(path):
        raise UserError(f"{path} does not exist; set {source['where']}.path to a directory written by "
                        "datasets' save_to_disk.")
    if source["kind"] == "hub" and hub_cache_entry(path, source.get("subset")) is None:
        raise UserError(f"hub dataset {path} is not in the local Hugging Face cache ({datasets_cache_root()}) and "
                        f"qforge never downloads; fetch it once with `{fetch_command(source)}` where the hub is "
                        "reachable (with the same HF_HOME), then run again.")


def _load_file(source: Dict[str, Any], raw_cache: str, streaming: bool) -> Any:
    import datasets

    check_exists(source)
    path = source["path"]
    file_type = source["file_type"]
    if os.path.getsize(path) == 0 or (file_type == "json" and _only_blank(path)):
        raise UserError(f"{path} holds no records; point {source['where']}.path at a file with at least one example.")
    if file_type in ("json", "csv"):
        check_utf8(path)
    try:
        with _offline():
            dataset = datasets.load_dataset(file_type, data_files=path, split="train", cache_dir=raw_cache,
                                            streaming=streaming)
    except Exception as err:  # pyarrow's parse errors name no line: find it for JSONL, else the first line says what
        if file_type == "json" and not _starts_with_bracket(path):
            bad = first_bad_json_line(path)
            if bad is not None:
                message = f"{path} line {bad[0]} is not valid JSON ({bad[1]}); fix or remove that line."
                raise UserError(message) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} could not be read as {file_type} ({first}); fix the file or convert it to JSONL "
                        "with one object per line.") from None
    if not streaming and len(dataset) == 0:
        raise UserError(f"{path} holds no records; point {source['where']}.path at a file with at least one example.")
    return dataset


def check_utf8(path: str) -> None:
    """Text formats must be UTF-8: pyarrow reads other bytes into the table, and they fail later, far from here."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                position = offset + err.start
                raise UserError(f"{path} is not UTF-8 text (byte {position} is 0x{block[err.start]:02x}); save the "
                                "file as UTF-8, e.g. with: iconv -f latin1 -t utf-8 in.jsonl > out.jsonl.") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (it ends inside a multi-byte character); save the file as "
                        "UTF-8, e.g. with: iconv -f latin1 -t utf-8 in.jsonl > out.jsonl.") from None


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _only_blank(path: str) -> bool:
    with open(path, "rb") as f:
        return not f.read(1 << 16).strip() and os.path.getsize(path) < (1 << 16)


def _load_saved(source: Dict[str, Any], streaming: bool) -> Any:
    import datasets

    check_exists(source)
    path = source["path"]
    try:
        saved = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(f"{path} is a directory but not one written by datasets' save_to_disk; point "
                        f"{source['where']}.path at such a directory or at a data file.") from None
    if isinstance(saved, datasets.DatasetDict):
        if source["split"] not in saved:
            raise UserError(f"{path} has no split '{source['split']}' (it has {', '.join(saved)}); set "
                            f"{source['where']}.split to one of them.")
        saved = saved[source["split"]]
    return saved.to_iterable_dataset() if streaming else saved


def fetch_command(source: Dict[str, Any]) -> str:
    subset = f", {source['subset']!r}" if source.get("subset") else ""
    call = f"datasets.load_dataset({source['path']!r}{subset}, split={source['split']!r})"
    return f'python -c "import datasets; {call}"'


def _load_hub(source: Dict[str, Any], streaming: bool) -> Any:
    import datasets

    check_exists(source)
    hub_id, subset, split = source["path"], source.get("subset"), source["split"]
    try:
        with _offline():
            dataset = datasets.load_dataset(hub_id, subset, split=split, cache_dir=str(datasets_cache_root()))
    except (ValueError, FileNotFoundError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"hub dataset {hub_id} (subset {subset or 'default'}, split {split}) is not usable from the "
                        f"local cache ({first}); fetch it with `{fetch_command(source)}`.") from None
    return dataset.to_iterable_dataset() if streaming else dataset


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """datasets reads its offline switch at call time from datasets.config: qforge never reaches the hub."""
    import datasets.config

    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def required_columns(source: Dict[str, Any]) -> List[str]:
    columns = source["columns"]
    if source["format"] == "alpaca":
        return [columns.get("instruction", "instruction"), columns.get("output", "output")]
    return [columns.get("conversations", "conversations")]


def check_columns(source: Dict[str, Any], dataset: Any) -> None:
    """A missing column is one sentence naming the source, its columns and the mapping that fixes it."""
    names = list(getattr(dataset, "column_names", None) or [])
    if not names:  # an iterable dataset whose columns are only known by reading it
        return
    for field in FIELDS[source["format"]]:
        mapped = source["columns"].get(field)
        if mapped is not None and mapped not in names and field not in ("role", "content"):
            raise UserError(f"{label(source)} has no column '{mapped}' (data.columns.{field}); its columns are "
                            f"{', '.join(names)}.")
    for needed in required_columns(source):
        if needed in names or (source["format"] == "sharegpt" and needed == "conversations" and "messages" in names):
            continue
        field = "instruction" if needed == source["columns"].get("instruction", "instruction") else (
            "output" if source["format"] == "alpaca" else "conversations")
        raise UserError(f"{label(source)} record 1 has no field '{needed}' (its columns: {', '.join(names)}), which "
                        f"the {source['format']} format needs; map yours with +data.columns.{field}=<your column> "
                        "or set data.format.")


def _quiet_datasets() -> None:
    """datasets logs a warning when it takes a hub dataset from its cache offline: that is the point here."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
