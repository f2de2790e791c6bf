"""Where an export goes: a new dir, written whole or not at all, never over an earlier export."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator

from trainer.errors import UserError

MANIFEST = "qforge_export.json"


def output_dir(cfg: Any, name: str) -> Path:
    if cfg.output_dir:
        out = Path(os.path.expanduser(str(cfg.output_dir))).absolute()
    else:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        method = cfg.export.method.value + (str(cfg.export.bits) if cfg.export.method.value == "gptq" else "")
        out = Path(str(cfg.output_root)).absolute() / "export" / f"{name}-{method}-{stamp}"
    if out.exists():
        raise UserError(f"output_dir={out} already exists; an export never overwrites one: pick a new output_dir, "
                        "or leave it unset for a fresh dir under output_root/export/.")
    if out.parent.exists() and not os.access(out.parent, os.W_OK):
        raise UserError(f"{out.parent} is not writable by this user; set output_dir to a dir you can write.")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A scratch dir beside `out`, renamed to `out` only when everything in it is written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield scratch
        if out.exists():
            raise UserError(f"{out} appeared while the export was written; it was left as it is, and this export "
                            "was discarded: pick a new output_dir.")
        os.rename(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_manifest(target: Path, manifest: Dict[str, Any]) -> None:
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
