"""The run dir: created once validation passed, never reused for a finished run.

Hydra's own per-run dir is switched off (conf/hydra/default.yaml) so an illegal composition creates
nothing; this module creates the dir and writes `.hydra/` the way Hydra would (config.yaml, overrides.yaml),
plus the resolved config (for tracking) and the plan every rank trains from (plan.json).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from trainer.errors import UserError

FINISHED_MARKER = "metrics.json"


def is_finished(run_dir: str) -> bool:
    return (Path(run_dir) / FINISHED_MARKER).exists()


@dataclass(frozen=True)
class Composition:
    """What a run dir records of how the run was composed: the config (as Hydra saves it) and the overrides."""

    config_yaml: str
    resolved: Dict[str, Any]
    overrides: List[str]

    @classmethod
    def of(cls, cfg: Any, overrides: List[str]) -> Composition:
        return cls(OmegaConf.to_yaml(cfg), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                   list(overrides))  # type: ignore[arg-type]


def create(plan: Any, composition: Composition) -> Path:
    """Make a fresh run dir, or take up an interrupted one (trainer/inputs.py checked it is the same run).

    An interrupted run keeps the config and overrides it was started with; only its plan is written again
    (same composition, but the machine it resumes on decides e.g. the GPU count).
    """
    path = Path(plan.run_dir)
    if is_finished(plan.run_dir):
        raise UserError(f"run dir {plan.run_dir} already holds a finished run ({FINISHED_MARKER}); "
                        "leave run_dir unset for a fresh dir, or pick a new one.")
    hydra_dir = path / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    if not (hydra_dir / "config.yaml").is_file():
        _write_atomic(hydra_dir / "config.yaml", composition.config_yaml)
        _write_atomic(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(composition.overrides)))
        _write_atomic(hydra_dir / RESOLVED, json.dumps(composition.resolved, indent=2, default=str) + "\n")
    plan.write()
    return path


RESOLVED = "resolved.json"


def saved_config(run_dir: str) -> Dict[str, Any]:
    """The composed config as the run used it (interpolations resolved), for tracking; {} if absent."""
    path = Path(run_dir) / ".hydra" / RESOLVED
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_atomic(path: Path, text: str) -> None:
    # A unique temp name: every node of a multi-node launch may write the same file at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dirs_to_make(path: Path) -> List[Path]:
    """The dirs (deepest first) that creating `path` will make: the ones a failed start may remove again."""
    made = []
    while not path.exists():
        made.append(path)
        path = path.parent
    return made


# What a run keeps beside run dirs in an output root: the tokenized data cache and the checkpoint key.
ROOT_INTERNALS = (".data_cache", ".qforge")


def remove_made(made: List[Path]) -> None:
    """Undo a start that failed before anything worth keeping: the run dir, then its new parents while empty.

    A parent this start made (an output root that did not exist) may hold only what this start put there
    beside the run dir (a half-built data cache, the checkpoint key): that goes too.
    """
    if not made:
        return
    shutil.rmtree(made[0], ignore_errors=True)
    for parent in made[1:]:  # e.g. outputs/<date>/ and outputs/ made for this run
        for internal in ROOT_INTERNALS:
            if (parent / internal).is_dir():
                shutil.rmtree(parent / internal, ignore_errors=True)
        try:
            parent.rmdir()
        except OSError:
            break
