"""A hub dataset in the local Hugging Face caches, as `datasets.load_dataset(repo_id)` leaves it after a download.

Only the network is simulated: `load_dataset` runs for real (datasets' packaged json builder, its cache naming,
Arrow preparation, dataset_info.json), but the two calls that would reach the hub are answered locally:
the module factory returns what HubDatasetModuleFactory builds for a repo holding one JSONL file per split
(json builder, commit hash, one "default" config whose data files are hf:// URLs), and the download of an
hf:// URL returns the file from the hub file cache (HF_HUB_CACHE/datasets--org--name/snapshots/<rev>/...),
where huggingface_hub would have put it. What qforge then reads is the real datasets cache, offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

REVISION = "0123456789abcdef0123456789abcdef01234567"


def populate(hf_home: Path, repo_id: str, splits: Dict[str, List[dict]], monkeypatch) -> None:
    """Write the repo's files into HF_HOME/hub and let load_dataset prepare them into HF_HOME/datasets."""
    import datasets
    import datasets.download.download_manager as download_manager
    import datasets.load as load
    from datasets.data_files import DataFilesDict, DataFilesList
    from datasets.load import DatasetModule
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from datasets.packaged_modules.json.json import JsonConfig
    from datasets.utils.metadata import MetadataConfigs

    snapshot = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}" / "snapshots" / REVISION
    files = {}
    for split, rows in splits.items():
        path = snapshot / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = DataFilesList([f"hf://datasets/{repo_id}@{REVISION}/data/{split}.jsonl"], origin_metadata=[None])
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(REVISION)

    base_path = f"hf://datasets/{repo_id}@{REVISION}"

    def module(*args, **kwargs):  # fresh per call: load_dataset_builder pops keys of builder_kwargs
        return DatasetModule(
            _PACKAGED_DATASETS_MODULES["json"][0], REVISION,
            {"base_path": base_path, "dataset_name": repo_id.split("/")[-1], "repo_id": repo_id},
            builder_configs_parameters=load.BuilderConfigsParameters(
                metadata_configs=MetadataConfigs(), builder_configs=[JsonConfig(name="default",
                                                                                data_files=DataFilesDict(files))],
                default_config_name="default"))
    real_cached_path = download_manager.cached_path

    def from_hub_cache(url, *args, **kwargs):
        match = re.match(r"hf://datasets/([^@]+)@([0-9a-f]+)/(.+)", str(url))
        if not match:
            return real_cached_path(url, *args, **kwargs)
        repo, revision, name = match.groups()
        return str(hf_home / "hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / revision / name)

    with monkeypatch.context() as patched:
        patched.setattr(load, "dataset_module_factory", module)
        patched.setattr(download_manager, "cached_path", from_hub_cache)
        for split in splits:
            datasets.load_dataset(repo_id, split=split, cache_dir=str(hf_home / "datasets"))
