"""Files and dirs a run will read or write, checked after validation and before anything is created or touched.

The validator judges the composition; this judges the filesystem it points at: the data file, the model and
tokenizer dirs, adapters to load, the run dir (fresh, resumable, or off limits) and the output root. Every
finding is one UserError sentence with a fix, so a bad path never costs a model load, never leaves a run dir
behind, and never writes into an earlier run. Cheap checks only (stat, a small JSON read): no torch, no
tokenizer load; what only loading can reveal is wrapped where it is loaded (trainer/model.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from trainer import checkpoints, rundir
from trainer.errors import UserError

# What datasets' save_to_disk leaves in a Dataset dir (state.json) or a DatasetDict dir (dataset_dict.json).
SAVED_MARKERS = ("state.json", "dataset_dict.json")
# Files a transformers tokenizer is made from: at least one of them must hold something.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


def check(cfg: Any, run_dir: str, data: Optional[Dict[str, Any]] = None) -> None:
    """Raise the first problem as a UserError; return quietly when every input looks usable.

    data: the plan's data spec (trainer/data/spec.py), whose sources are checked where the run will read them.
    """
    if data is not None:
        _check_data(data)
    _check_model(cfg)
    _check_adapters(cfg)
    _check_run_dir(cfg, run_dir)
    _check_resume(cfg, run_dir)
    _check_wandb(cfg)


def _check_resume(cfg: Any, run_dir: str) -> None:
    """A checkpoint to resume must be one this output root wrote (its signed manifest), checked before launch."""
    if not cfg.do_train:
        return
    resume = str(cfg.train.resume)
    if resume == "never" or (resume == "auto" and not Path(run_dir).is_dir()):
        return
    # No key yet means no run under this output root ever signed a checkpoint: nothing verifies.
    key = checkpoints.existing_key(str(cfg.output_root)) or b""
    checkpoints.resume_path(resume, run_dir, key=key, discard=False)


def _check_wandb(cfg: Any) -> None:
    """logger.mode=online needs a route to the wandb server: known now on this host (not so for Slurm's nodes)."""
    if cfg.logger.name.value != "wandb" or cfg.logger.mode.value != "online" or cfg.launcher.name.value == "slurm":
        return
    from trainer.tracking import server_reachable, wandb_server

    if not server_reachable(wandb_server()):
        raise UserError(f"logger.mode=online, but the wandb server {wandb_server()} cannot be reached from this host; "
                        "use logger.mode=auto (logs offline here, sync later) or logger.mode=offline.")


def _check_data(data: Dict[str, Any]) -> None:
    """Each source of the plan's data spec is there: a readable file, a dir save_to_disk wrote, a cached hub id."""
    from trainer.data.sources import check_exists

    for source in data.get("sources", []):
        check_exists(source)
        path = Path(source["path"])
        if source["kind"] == "file" and not os.access(path, os.R_OK):
            raise UserError(f"data file {path} cannot be read by this user; fix its permissions or copy it "
                            "somewhere readable.")
        if source["kind"] == "saved" and not any((path / name).is_file() for name in SAVED_MARKERS):
            raise UserError(f"{path} is a directory but not one written by datasets' save_to_disk; point "
                            f"{source['where']}.path at such a directory or at a data file.")


def _check_model(cfg: Any) -> None:
    source = cfg.model.name_or_path
    if source is None:
        return
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        if str(source).startswith(("/", ".", "~")) or str(source).count("/") != 1:
            raise UserError(f"model path {source} does not exist; set model.name_or_path to a local "
                            "model directory or a hub id such as org/name.")
        return  # a hub id: found in the local HF cache at load time, or the loader says what to do
    if not (path / "config.json").is_file():
        raise UserError(f"model path {source} has no config.json, so it is not a transformers model "
                        "directory; point model.name_or_path at the directory that holds config.json.")
    _check_tokenizer_dir(path, str(source))


def _check_tokenizer_dir(path: Path, shown: str) -> None:
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        raise UserError(f"model dir {shown} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                        "tokenizer files of the original model into it.")
    if all((path / name).stat().st_size == 0 for name in present):
        raise UserError(f"the tokenizer files in {shown} ({', '.join(present)}) are empty; copy them again from the "
                        "original model.")
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        file = path / name
        if file.is_file() and file.stat().st_size > 0:
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"{file} is not valid JSON, so the tokenizer cannot be loaded; copy it again "
                                "from the original model.") from None


def _check_adapters(cfg: Any) -> None:
    for adapter in cfg.model.adapters:
        path = Path(os.path.expanduser(str(adapter)))
        if path.is_dir():
            if not (path / "adapter_config.json").is_file():
                raise UserError(f"model.adapters lists {adapter}, which has no adapter_config.json, so it is not a "
                                "PEFT adapter; point it at the adapter/ dir of a finished run.")
            continue
        if path.exists() or str(adapter).startswith(("/", ".", "~")) or str(adapter).count("/") != 1:
            raise UserError(f"model.adapters lists {adapter}, which is not a directory; point it at the adapter/ "
                            "dir of a finished run, or drop it from model.adapters.")


def _check_run_dir(cfg: Any, run_dir: str) -> None:
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"run_dir={run_dir} is a file, not a directory; pick a directory path for run_dir, or leave "
                        "it unset for a fresh dir under output_root.")
    if not path.exists():
        _check_writable(path, cfg)
        return
    if rundir.is_finished(run_dir):
        raise UserError(f"run dir {run_dir} already holds a finished run ({rundir.FINISHED_MARKER}); "
                        "leave run_dir unset for a fresh dir, or pick a new one.")
    saved = path / ".hydra" / "config.yaml"
    if not saved.is_file():
        # Only .hydra/: another node's launcher of this multi-node run is writing it right now.
        if any(p.name != ".hydra" for p in path.iterdir()):
            raise UserError(f"run_dir={run_dir} is a directory that holds other files and no qforge run; pick an "
                            "empty or new directory, or leave run_dir unset.")
        _check_writable(path, cfg)
        return
    resume = str(cfg.train.resume)
    has_checkpoints = bool(checkpoints.all_checkpoints(checkpoints.checkpoint_dir(run_dir)))
    if resume == "never" and has_checkpoints:
        raise UserError(f"train.resume=never starts over, but run dir {run_dir} holds an earlier run's checkpoints; "
                        "leave run_dir unset for a fresh dir, or use train.resume=auto to continue that run.")
    changed = changed_keys(OmegaConf.load(saved), cfg)
    if changed:
        shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
        raise UserError(f"run dir {run_dir} holds a run composed differently ({shown}); re-run it with the same "
                        "overrides to resume it, or leave run_dir unset for a new run.")
    _check_writable(path, cfg)


# Keys that may differ between the first attempt of a run and its resumption.
# (launcher.node_rank: every node of a multi-node torchrun launch passes the same run_dir with its own rank.)
RESUME_MAY_CHANGE = ("run_dir", "dry_run", "train.resume", "run_name", "launcher.node_rank")


def changed_keys(saved: Any, current: Any) -> List[str]:
    """'key: old -> new' for every leaf that differs between a run dir's saved config and this composition."""
    old = _flatten(OmegaConf.to_container(saved, resolve=False, enum_to_str=True))
    new = _flatten(OmegaConf.to_container(current, resolve=False, enum_to_str=True))
    differ = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUME_MAY_CHANGE) or key.startswith("hydra."):
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            differ.append(f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return differ


def _flatten(node: Any, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out: dict = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _check_writable(path: Path, cfg: Any) -> None:
    """The nearest existing ancestor of `path` must be a writable directory (output_root included)."""
    probe: Optional[Path] = path
    while probe is not None and not probe.exists():
        probe = probe.parent if probe.parent != probe else None
    if probe is None:
        return
    if not probe.is_dir():
        raise UserError(f"{probe} is a file, so the run dir {path} cannot be made under it; set output_root (or "
                        "run_dir) to a directory path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{probe} is not writable by this user, so the run dir {path} cannot be made there; set "
                        f"output_root to a directory you can write (now output_root={cfg.output_root}).")
