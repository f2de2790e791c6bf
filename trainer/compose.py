"""Everything Hydra needs before composing (schema, resolvers), and composition for tools and tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf

from trainer.schema import register_schema

ASSETS = Path(__file__).parent / "assets"


def conf_dir() -> str:
    """conf/ beside the package in a checkout or editable install, else the installed copy."""
    beside = Path(__file__).resolve().parent.parent / "conf"
    if (beside / "train.yaml").exists():
        return str(beside)
    spec = importlib.util.find_spec("qforge_conf")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qforge's conf/ is missing from this installation; reinstall qforge")
    return str(list(spec.submodule_search_locations)[0])


def register() -> None:
    register_schema()
    if not OmegaConf.has_resolver("asset"):
        # ${asset:name} is a file the package ships (sample data, tokenizer).
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name))


def compose(overrides: Optional[Sequence[str]] = None) -> Any:
    """Compose conf/train.yaml with overrides, exactly as `python train.py` would (no run dir)."""
    return compose_all([list(overrides or [])])[0]


def compose_all(override_sets: Sequence[Sequence[str]]) -> List[Any]:
    """Several compositions under one Hydra initialisation (a sweep's combinations, the matrix's cells)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return [hydra_compose(config_name="train", overrides=list(o)) for o in override_sets]
