"""Plan time: the data spec, a JSON-able description of what a run trains on, built from the composed config.

No torch and no `datasets` here (a login node plans runs): sources are resolved to absolute paths or hub ids,
their identity (size and mtime, or the hub cache entry) and record counts are read from the filesystem, the
template is named or read from its Jinja file (path + sha256), and everything that decides the tokenized
result goes into one fingerprint. build_plan stores the spec under the plan's `data` key; ranks read only it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.data.mixture import planned_counts

# Bump when the tokenized cache's layout or content changes for the same inputs.
FORMAT_VERSION = 1
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
NAMED_TEMPLATES = ("alpaca", "chatml", "llama3", "qwen2", "mistral")
# The fields a record of each format is read from; data.columns maps them to a source's own column names.
FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "role", "content", "system"),
}
ALL_FIELDS = tuple(sorted({f for fields in FIELDS.values() for f in fields}))
# Attention implementations that take one flattened row with restarting position ids (varlen kernels).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def entries(cfg: Any) -> List[Dict[str, Any]]:
    """The configured sources as plain dicts, unset fields filled from data.* (no filesystem access)."""
    data = cfg.data
    shared_columns = dict(data.columns or {})
    if data.sources:
        configured = [(f"data.sources[{i}]", s) for i, s in enumerate(data.sources)]
    else:
        configured = [("data", data)]
    out = []
    for where, source in configured:
        own = source is not data
        max_samples = source.max_samples if own and source.max_samples is not None else data.max_samples
        columns = dict(source.columns) if own and source.columns is not None else shared_columns
        out.append({
            "where": where,
            "path": None if source.path is None else str(source.path),
            "kind": _value(source.kind),
            "format": _value(source.format if own and source.format is not None else data.format),
            "subset": source.subset if own and source.subset is not None else data.subset,
            "split": source.split if own and source.split is not None else data.split,
            "weight": float(source.weight) if own else 1.0,
            "max_samples": max_samples,
            "columns": columns,
        })
    return out


def looks_like_hub_id(path: str) -> bool:
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and Path(path).suffix.lower() not in FILE_TYPES


def resolve_kind(path: str, kind: str) -> str:
    if kind != "auto":
        return kind
    expanded = Path(os.path.expanduser(path))
    if expanded.is_dir():
        return "saved"
    if expanded.exists() or not looks_like_hub_id(path):
        return "file"
    return "hub"


def datasets_cache_root() -> Path:
    """Where `datasets` keeps prepared (Arrow) datasets: HF_DATASETS_CACHE, else HF_HOME/datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_DATASETS_CACHE"]))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "datasets"


def _snake(name: str) -> str:
    """datasets.naming.camelcase_to_snakecase, which names a hub dataset's cache folder."""
    import re

    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name)
    return name.lower()


def hub_cache_entry(hub_id: str, subset: Optional[str]) -> Optional[Path]:
    """The newest prepared copy `load_dataset(hub_id, subset)` left in the datasets cache, as datasets finds it.

    datasets (packaged_modules/cache) looks in <cache>/<org>___<name>/<config>/<version>/<hash>/; so does this.
    """
    parts = hub_id.split("/")
    parts[-1] = _snake(parts[-1])
    root = datasets_cache_root() / "___".join(parts)
    found = [p for p in root.glob(f"{subset or '*'}/*/*") if (p / "dataset_info.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def identity(kind: str, path: str, subset: Optional[str]) -> Optional[Dict[str, Any]]:
    """What changes when the data changes: size and mtime of every file (None: not there at plan time)."""
    if kind == "hub":
        entry = hub_cache_entry(path, subset)
        if entry is None:
            return None
        return {"cache_entry": str(entry), "files": _files_digest(entry)}
    target = Path(os.path.expanduser(path))
    if target.is_file():
        stat = target.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if target.is_dir():
        return {"files": _files_digest(target)}
    return None


def _files_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = file.stat()
        h.update(f"{file.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def count_records(kind: str, path: str, file_type: Optional[str], subset: Optional[str],
                  split: str) -> Optional[int]:
    """The number of records, where it is cheap to know without reading the data; None otherwise."""
    try:
        if kind == "file" and file_type == "json":
            return _count_json(Path(os.path.expanduser(path)))
        if kind == "file" and file_type == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(os.path.expanduser(path)).metadata.num_rows)
        if kind in ("saved", "hub"):
            where = hub_cache_entry(path, subset) if kind == "hub" else Path(os.path.expanduser(path))
            return _split_rows(where, split) if where is not None else None
    except (OSError, ValueError, ImportError):
        return None
    return None


def _count_json(file: Path) -> Optional[int]:
    with file.open("rb") as f:
        head = f.read(4096).lstrip()
        if head.startswith(b"["):
            return None  # a JSON array: counting means parsing it; the run logs the number
        f.seek(0)
        lines, last = 0, b"\n"
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
        return lines + (last != b"\n")


def _split_rows(directory: Path, split: str) -> Optional[int]:
    """Rows of a split from dataset_info.json (hub cache) or a save_to_disk dir's split folder."""
    info = directory / "dataset_info.json"
    if (directory / "dataset_dict.json").is_file():
        info = directory / split / "dataset_info.json"
        if (directory / split / "state.json").is_file():
            return _state_rows(directory / split)
    elif (directory / "state.json").is_file():
        return _state_rows(directory)
    if info.is_file():
        splits = json.loads(info.read_text()).get("splits") or {}
        if split in splits and splits[split].get("num_examples") is not None:
            return int(splits[split]["num_examples"])
    return None


def _state_rows(directory: Path) -> Optional[int]:
    import pyarrow as pa

    state = json.loads((directory / "state.json").read_text())
    rows = 0
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(directory / entry["filename"])) as source:
            rows += pa.ipc.open_stream(source).read_all().num_rows
    return rows


def template_spec(template: str) -> Dict[str, Any]:
    """A named template, auto, or a Jinja file (absolute path + sha256 of its text, checked again at run time)."""
    if template == "auto" or template in NAMED_TEMPLATES:
        return {"name": template}
    path = Path(os.path.expanduser(template)).resolve()
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    return {"name": "file", "path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def is_template_file(template: str) -> bool:
    return Path(os.path.expanduser(template)).is_file()


def tokenizer_files(cfg: Any) -> Optional[Path]:
    """The directory the run's tokenizer comes from, when it is on this machine (None: a hub id)."""
    if cfg.model.name_or_path is None:
        from trainer.tiny import TOKENIZER_DIR

        return TOKENIZER_DIR
    path = Path(os.path.expanduser(str(cfg.model.name_or_path)))
    return path if path.is_dir() else None


def has_chat_template(directory: Path) -> Optional[bool]:
    """Whether a tokenizer dir ships a chat template (tokenizer_config.json or chat_template.jinja/json)."""
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


def cache_dir(cfg: Any) -> str:
    chosen = cfg.data.cache_dir or os.path.join(str(cfg.output_root), ".data_cache")
    return os.path.abspath(os.path.expanduser(str(chosen)))


def data_spec(cfg: Any) -> Dict[str, Any]:
    """Everything the ranks need to build (or find) the tokenized data, as plain values."""
    do_eval = bool(cfg.do_eval)
    sources = []
    for entry in entries(cfg):
        path = entry["path"] or ""
        kind = resolve_kind(path, entry["kind"])
        resolved = path if kind == "hub" else os.path.abspath(os.path.expanduser(path))
        file_type = FILE_TYPES.get(Path(path).suffix.lower(), "json") if kind == "file" else None
        records = count_records(kind, resolved, file_type, entry["subset"], entry["split"])
        sources.append({
            **{k: v for k, v in entry.items() if k != "path"},
            "path": resolved,
            "kind": kind,
            "file_type": file_type,
            "identity": identity(kind, resolved, entry["subset"]),
            "records": records,
        })
    eval_fraction = float(cfg.data.eval_fraction) if do_eval else 0.0
    spec: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "template": template_spec(str(cfg.data.template)),
        "sources": sources,
        "max_seq_len": int(cfg.train.max_seq_len),
        "packing": bool(cfg.train.packing),
        "flatten_packed_batches": cfg.model.attn_implementation in VARLEN_ATTENTION,
        "streaming": bool(cfg.data.streaming),
        "eval_fraction": eval_fraction,
        "split_seed": int(cfg.data.split_seed),
        "cache_dir": cache_dir(cfg),
        "num_proc": cfg.data.num_proc,
    }
    counts = planned_counts([_used(s) for s in sources], [s["weight"] for s in sources], eval_fraction)
    if counts is not None:
        for source, (n_train, n_eval) in zip(sources, counts):
            source["planned_train_examples"], source["planned_eval_examples"] = n_train, n_eval
        spec["planned_examples"] = {"train": sum(c[0] for c in counts), "eval": sum(c[1] for c in counts)}
    spec["fingerprint"] = fingerprint(spec)
    return spec


def _used(source: Dict[str, Any]) -> Optional[int]:
    if source["records"] is None:
        return None
    cap = source["max_samples"]
    return min(source["records"], cap) if cap else source["records"]


# Keys that never change the tokenized result: where it is cached, how many workers build it, display only.
_NOT_FINGERPRINTED = {"cache_dir", "num_proc", "fingerprint", "planned_examples", "flatten_packed_batches"}
_SOURCE_DISPLAY = {"where", "records", "planned_train_examples", "planned_eval_examples"}


def fingerprint(spec: Dict[str, Any]) -> str:
    """sha256 over what decides the tokenized data; run time adds the tokenizer's content hash (cache.key)."""
    recipe = {k: v for k, v in spec.items() if k not in _NOT_FINGERPRINTED}
    recipe["sources"] = [{k: v for k, v in s.items() if k not in _SOURCE_DISPLAY} for s in spec["sources"]]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
