"""`python -m trainer.export`: a finished run, or a base model and adapters, written out for serving.

    python -m trainer.export run_dir=outputs/<date>/<run> output_dir=/models/my-sft        # merged bf16 (default)
    python -m trainer.export export.method=adapter run_dir=outputs/<date>/<run>          # adapter + model card
    python -m trainer.export export.method=gptq run_dir=... export.dataset=/data/set.jsonl
    python -m trainer.export model=local model.name_or_path=/models/base model.adapters=[<adapter>] ...

compose (conf/export.yaml) -> rules (trainer/export_rules.py, through the validator) -> the source (a run's plan,
or the model group) checked on disk -> the method: merged (trainer/export/merged.py), gptq (gptq.py) or adapter
(adapter.py) -> a new output dir, renamed into place only once complete (writing.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List

from trainer.errors import UserError

log = logging.getLogger("qforge")


def run_export(cfg: Any) -> Path:
    """Run one export from a composed config; returns the output directory."""
    from trainer.export import source as sources
    from trainer.export.writing import output_dir
    from trainer.export_rules import RULES
    from trainer.validate import validate

    report = validate(cfg, rules=RULES)
    if not report.ok:
        # Every violated rule at once, as the training validator reports them.
        raise UserError(report.summary())
    source = sources.resolve(cfg)
    out = output_dir(cfg, source.name)
    method = cfg.export.method.value
    if method == "merged":
        from trainer.export.merged import export_merged

        export_merged(cfg, source, out)
    elif method == "gptq":
        from trainer.export.gptq import export_gptq

        export_gptq(cfg, source, out)
    else:
        from trainer.export.adapter import export_adapter

        export_adapter(cfg, source, out)
    return out


def compose_export(overrides: List[str]) -> Any:
    """Compose conf/export.yaml with overrides, exactly as `python -m trainer.export` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer.compose import conf_dir, register
    from trainer.export_schema import register_export_schema

    register()
    register_export_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))

