"""Checkpoints a run can trust: completeness markers, rotation, and where to resume from.

The HF Trainer writes `checkpoint-N/` file by file, on every rank (optimizer shards, RNG states), so a
crash mid-save leaves a directory that looks like a checkpoint but is not one. After every save all
ranks meet at a barrier, then rank 0 writes COMPLETE_MARKER last, atomically. Only marked
checkpoints are resumed from or counted for rotation, so the previous complete checkpoint survives
any crash during the next save. (The Trainer's own save_total_limit is off in the plan for this
reason: it deletes by age, complete or not.)

A checkpoint holds pickles (optimizer and RNG states, DeepSpeed's and torch.distributed.checkpoint's files),
and loading a pickle runs code. So the marker is also a manifest: the sha256 of every file in the checkpoint,
signed (HMAC-SHA256) with a key that lives in the output root (KEY_FILE, readable by its owner only). A resume
takes only a checkpoint whose manifest verifies with that key and whose files match it, byte for byte: one this
run, or another run of the same output root, wrote. Anything else (a checkpoint from elsewhere, or one changed
since it was saved) is refused with one sentence before any of its files is opened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.errors import UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "qforge_complete.json"
KEY_FILE = ".qforge/checkpoint.key"  # under the output root
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else -1


def all_checkpoints(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)), key=step_of)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(root: Path) -> List[Path]:
    return [p for p in all_checkpoints(root) if is_complete(p)]


def newest_complete(root: Path) -> Optional[Path]:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def existing_key(output_root: str) -> Optional[bytes]:
    """The output root's key if it has one (read-only: the launcher's input check creates nothing)."""
    path = Path(output_root) / KEY_FILE
    return bytes.fromhex(path.read_text().strip()) if path.is_file() else None


def signing_key(output_root: str) -> bytes:
    """The output root's checkpoint key, made on first use (owner-only permissions)."""
    path = Path(output_root) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent run keeps the key that is already there
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def file_hashes(path: Path) -> Dict[str, str]:
    """sha256 of every file under a checkpoint dir (the marker aside), by path relative to it."""
    hashes = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative in (COMPLETE_MARKER, f".{COMPLETE_MARKER}.tmp"):
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[relative] = digest.hexdigest()
    return hashes


def _signature(key: bytes, step: int, files: Dict[str, str]) -> str:
    payload = json.dumps({"step": step, "files": files}, sort_keys=True).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def mark_complete(path: Path, step: int, key: bytes) -> None:
    """Write the signed manifest last and atomically: it exists only once every file before it does."""
    files = file_hashes(path)
    tmp = path / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files, "signature": _signature(key, step, files)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)


def verify(path: Path, key: bytes) -> None:
    """Refuse, in one sentence, a checkpoint this output root did not write or that changed since it was saved."""
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
        files, signature = marker["files"], marker["signature"]
        step = int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} has no signed qforge manifest, so qforge cannot tell who wrote it and will not "
                        "load its pickled files; resume only checkpoints qforge wrote under this output_root."
                        ) from None
    if not hmac.compare_digest(signature, _signature(key, step, files)):
        raise UserError(f"{path} was not written by a run of this output_root (its manifest's signature does not "
                        "match this output root's key), so its pickled files are not loaded; resume a checkpoint "
                        "of a run under this output_root, or train from the start.")
    found = file_hashes(path)
    if found != files:
        changed = sorted(set(found) ^ set(files) | {k for k in found.keys() & files.keys() if found[k] != files[k]})
        raise UserError(f"{path} changed after it was saved ({', '.join(changed[:3])} differ from its manifest), so "
                        "it is not loaded; resume an earlier checkpoint-N, or train from the start.")


def rotate(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete ones below them."""
    done = complete_checkpoints(root)
    if not done:
        return
    newest_step = step_of(done[-1])
    doomed = done[:-keep] if keep > 0 else []
    doomed += [p for p in all_checkpoints(root) if not is_complete(p) and step_of(p) < newest_step]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def discard_incomplete(root: Path) -> None:
    """A save the last run died in: its files would mix with the new save of the same step."""
    for path in all_checkpoints(root):
        if not is_complete(path):
            log.info("discarding incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def resume_path(resume: str, run_dir: str, key: Optional[bytes] = None, discard: bool = True) -> Optional[str]:
    """train.resume: auto (newest complete checkpoint in the run dir, if any), never, or a path.

    With `key`, the checkpoint's signed manifest is verified before its path is returned. `discard` removes
    torn saves (on rank 0 only, at run time; never during the launcher's read-only input check).
    """
    if resume == "never":
        return None
    if resume == "auto":
        if discard and int(os.environ.get("RANK", "0")) == 0:
            discard_incomplete(checkpoint_dir(run_dir))
        found = newest_complete(checkpoint_dir(run_dir))
        if found and key is not None:
            verify(found, key)
        return str(found) if found else None
    path = Path(os.path.expanduser(resume))
    if not path.is_dir():
        raise UserError(f"train.resume={resume} is not a directory; set it to a checkpoint-N dir of an earlier "
                        "run, or to auto (the newest complete checkpoint in run_dir) or never.")
    if not is_complete(path):
        raise UserError(f"train.resume={resume} is not a complete qforge checkpoint (no {COMPLETE_MARKER}: "
                        "it was interrupted while saving); pick an earlier checkpoint-N dir, or train.resume=auto.")
    if key is not None:
        verify(path, key)
    return str(path)


def completeness_callback(keep: Optional[int], key: bytes) -> Any:
    """A TrainerCallback that marks each checkpoint complete (signed manifest) once every rank wrote its part."""
    from transformers import TrainerCallback

    class CheckpointCompleteness(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has finished writing its shards and RNG state
            if state.is_world_process_zero:
                root = Path(args.output_dir)
                path = root / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    mark_complete(path, state.global_step, key)
                    rotate(root, keep or 0)

    return CheckpointCompleteness()
