"""The run dir: created once validation passed, never reused for a finished run.

Hydra's own per-run dir is switched off (conf/hydra/default.yaml) so an illegal composition creates
nothing; this module creates the dir and writes `.hydra/` the way Hydra would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from trainer.errors import UserError

FINISHED_MARKER = "metrics.json"


def is_finished(run_dir: str) -> bool:
    return (Path(run_dir) / FINISHED_MARKER).exists()


def create(run_dir: str, cfg: Any, overrides: List[str], plan: Dict[str, Any]) -> Path:
    path = Path(run_dir)
    if is_finished(run_dir):
        raise UserError(f"run dir {run_dir} already holds a finished run ({FINISHED_MARKER}); "
                        "leave run_dir unset for a fresh dir, or pick a new one.")
    hydra_dir = path / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    (hydra_dir / "plan.json").write_text(json.dumps(plan, indent=2, default=str) + "\n")
    return path


def resolved_config(cfg: Any) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
