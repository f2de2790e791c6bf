"""The tokenized-data cache: one directory per key, built once by rank 0, complete or absent.

The key is the plan's data fingerprint (sources, columns, weights, split, template name or file sha,
max_seq_len, packing, format version) plus what only the run can see: the tokenizer's content hash, the
template text it resolved to, and each source's identity now (size + mtime, or the hub cache entry).
An entry is built in a scratch dir beside it and renamed into place with meta.json written last, so a crash
never leaves a half cache that looks complete. Other ranks wait for the entry (or for rank 0's failure
note) on the filesystem: the process group does not exist yet when data is prepared (before the model
loads), and a shared filesystem is what multi-node runs already need for the run dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from trainer.data.spec import identity
from trainer.errors import UserError

log = logging.getLogger(__name__)

META = "meta.json"
POLL_SECONDS = 0.5
# A waiting rank that sees neither rank 0's scratch dir nor the finished entry this long is on a filesystem rank 0
# does not write to (data.cache_dir not shared between nodes); without a limit it would wait forever.
VISIBLE_WITHIN_SECONDS = 600.0


def tokenizer_hash(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()[:16]


def cache_key(spec: Dict[str, Any], tokenizer: Any, template_text: Optional[str]) -> str:
    now = [identity(s["kind"], s["path"], s.get("subset")) for s in spec["sources"]]
    parts = {"fingerprint": spec["fingerprint"], "tokenizer": tokenizer_hash(tokenizer),
             "template": template_text or "", "sources_now": now}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entry(spec: Dict[str, Any], key: str) -> Path:
    return Path(spec["cache_dir"]) / key


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def read_meta(path: Path) -> Dict[str, Any]:
    return json.loads((path / META).read_text())


def _run_id() -> str:
    """Identifies this launch, so a waiting rank never acts on a failure note an earlier run left."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "") + ":" + os.environ.get("MASTER_PORT", "")


def _failure_note(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.failed.json"


def build_once(spec: Dict[str, Any], key: str, build: Callable[[Path], Dict[str, Any]], rank: int,
               world_size: int) -> Path:
    """The complete entry for `key`: found, built here (rank 0), or waited for (other ranks)."""
    target = entry(spec, key)
    if not is_complete(target):
        if rank == 0:
            _build(target, key, build, tell_others=world_size > 1)
        else:
            _wait(target, key)
    _barrier(world_size)
    return target


def _build(target: Path, key: str, build: Callable[[Path], Dict[str, Any]], tell_others: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    note = _failure_note(target.parent, key)
    note.unlink(missing_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".building-{key}-", dir=target.parent))
    started = time.monotonic()
    try:
        meta = build(scratch)
        meta.update({"key": key, "built_by": {"rank": 0, "host": socket.gethostname(), "pid": os.getpid()},
                     "build_seconds": round(time.monotonic() - started, 3), "built_at": time.time()})
        (scratch / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")  # last: marks it complete
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)  # not ours and not complete (a copy cut short): never read, replaced
        try:
            os.rename(scratch, target)
        except OSError:
            if not is_complete(target):  # another run built it meanwhile: theirs is the same data
                raise
    except BaseException as err:
        if not tell_others:
            raise
        message = str(err) if isinstance(err, UserError) else f"rank 0 failed while tokenizing ({type(err).__name__})"
        note.write_text(json.dumps({"run": _run_id(), "message": message}))
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _wait(target: Path, key: str) -> None:
    note = _failure_note(target.parent, key)
    waited, said = 0.0, 0.0
    rank_0_seen = False
    while not is_complete(target):
        rank_0_seen = rank_0_seen or any(target.parent.glob(f".building-{key}-*"))
        if not rank_0_seen and waited >= VISIBLE_WITHIN_SECONDS:
            raise UserError(f"this rank (host {socket.gethostname()}) waited {waited:.0f} s and saw no sign of rank 0 "
                            f"tokenizing into {target}: that directory is not shared with rank 0's node; set "
                            "data.cache_dir to a path on a filesystem every node sees.")
        if note.is_file():
            try:
                failure = json.loads(note.read_text())
            except (OSError, ValueError):
                failure = {}
            if failure.get("run") == _run_id():
                raise UserError(failure.get("message") or "rank 0 failed while tokenizing the data.")
        time.sleep(POLL_SECONDS)
        waited += POLL_SECONDS
        if waited - said >= 60:
            said = waited
            log.warning("data: waiting %.0f s for rank 0 to tokenize into %s (data.cache_dir must be on a "
                        "filesystem every node sees)", waited, target)


def _barrier(world_size: int) -> None:
    """Where a process group already exists (a caller that set one up), line the ranks up on it too."""
    if world_size < 2:
        return
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
