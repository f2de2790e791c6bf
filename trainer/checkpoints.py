"""Checkpoints a run can trust: completeness markers, rotation, and where to resume from.

The HF Trainer writes `checkpoint-N/` file by file, on every rank (optimizer shards, RNG states), so a
crash mid-save leaves a directory that looks like a checkpoint but is not one. After every save all
ranks meet at a barrier, then rank 0 writes COMPLETE_MARKER last, atomically. Only marked
checkpoints are resumed from or counted for rotation, so the previous complete checkpoint survives
any crash during the next save. (The Trainer's own save_total_limit is off in the plan for this
reason: it deletes by age, complete or not.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, List, Optional

from trainer.errors import UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "qforge_complete.json"
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


def mark_complete(path: Path, step: int) -> None:
    """Write the marker last and atomically: it exists only once every file before it does."""
    tmp = path / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)


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


def resume_path(resume: str, run_dir: str) -> Optional[str]:
    """train.resume: auto (newest complete checkpoint in the run dir, if any), never, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        if int(os.environ.get("RANK", "0")) == 0:
            discard_incomplete(checkpoint_dir(run_dir))
        found = newest_complete(checkpoint_dir(run_dir))
        return str(found) if found else None
    path = Path(os.path.expanduser(resume))
    if not path.is_dir():
        raise UserError(f"train.resume={resume} is not a directory; set it to a checkpoint-N dir of an earlier "
                        "run, or to auto (the newest complete checkpoint in run_dir) or never.")
    if not is_complete(path):
        raise UserError(f"train.resume={resume} is not a complete qforge checkpoint (no {COMPLETE_MARKER}: "
                        "it was interrupted while saving); pick an earlier checkpoint-N dir, or train.resume=auto.")
    return str(path)


def completeness_callback(keep: Optional[int]) -> Any:
    """A TrainerCallback that marks each checkpoint complete once every rank has written its part."""
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
                    mark_complete(path, state.global_step)
                    rotate(root, keep or 0)

    return CheckpointCompleteness()
