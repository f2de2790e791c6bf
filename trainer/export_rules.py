"""Rules of the exports (LLaMA-Factory's export checks for GPTQ), as data like every other rule.

They judge the composed export config (conf/export.yaml), not a training config, so the validator
of train.py does not run them; trainer.export runs them through the same validator (validate(cfg, RULES)),
and the matrix lists them in its rule table.
What needs the disk (is the base a 16-bit model, is a path an adapter) is checked in preflight.
"""

from __future__ import annotations

from typing import Any, List

from trainer.rules import Rule, error

GPTQ_BITS = (2, 3, 4, 8)


def _gptq(cfg: Any) -> bool:
    return cfg.export.method.value == "gptq"


def _adapters_given(cfg: Any) -> bool:
    return bool(cfg.model.adapters)

RULES: List[Rule] = [
    error(
        "export.one_source",
        ["export", "model"],
        lambda cfg: cfg.run_dir is not None and _adapters_given(cfg),
        "run_dir names a run whose adapter the export takes, and model.adapters lists adapters too.",
        "use run_dir=<run> alone, or model=... model.adapters=[...] without run_dir.",
    ),
    error(
        "export.needs_an_adapter",
        ["export", "model"],
        lambda cfg: cfg.run_dir is None and not _adapters_given(cfg),
        "there is nothing to export: neither run_dir nor model.adapters names an adapter.",
        "set run_dir=<a finished run dir>, or model=... model.adapters=[<adapter dir>].",
    ),
    error(
        "export.adapter_is_one",
        ["export", "model"],
        lambda cfg: cfg.export.method.value == "adapter" and len(cfg.model.adapters) > 1,
        "export.method=adapter copies one adapter, but model.adapters lists {cfg.model.adapters}.",
        "export one adapter at a time, or export.method=merged to merge them all into the base.",
    ),
    error(
        "export.gptq_bits",
        ["export"],
        lambda cfg: _gptq(cfg) and cfg.export.bits not in GPTQ_BITS,
        "GPTQ export quantizes to 2/3/4/8 bits, not export.bits={cfg.export.bits}.",
        "set export.bits to one of 2/3/4/8.",
    ),
    error(
        "export.calibration_dataset",
        ["export"],
        lambda cfg: _gptq(cfg) and not cfg.export.dataset,
        "GPTQ export needs a calibration dataset to fit its rounding, and export.dataset is not set.",
        "set export.dataset to a JSON/JSONL file of training-like text (e.g. the file you trained on).",
    ),
    error(
        "export.fp16_compute",
        ["export"],
        lambda cfg: _gptq(cfg) and cfg.export.compute_dtype.value != "float16",
        "GPTQ export computes in float16, not export.compute_dtype={cfg.export.compute_dtype.value}.",
        "set export.compute_dtype=float16.",
    ),
    error(
        "export.no_chatglm",
        ["export", "model"],
        lambda cfg: _gptq(cfg) and "chatglm" in str(cfg.model.family).lower(),
        "GPTQ export does not support ChatGLM models (model.family={cfg.model.family}).",
        "export a ChatGLM model unquantized, or quantize it with a ChatGLM-specific tool.",
    ),
    error(
        "export.positive_sizes",
        ["export"],
        lambda cfg: _gptq(cfg) and (cfg.export.nsamples < 1 or cfg.export.max_len < 8),
        "export.nsamples={cfg.export.nsamples} and export.max_len={cfg.export.max_len} leave GPTQ "
        "no calibration tokens.",
        "set export.nsamples >= 1 and export.max_len >= 8 (128 and 512 are good defaults).",
    ),
]

