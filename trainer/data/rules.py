"""Rules on the data group (torch-free, gathered by trainer.rules.all_rules)."""

from __future__ import annotations

from typing import Any

from trainer.data.spec import ALL_FIELDS, NAMED_TEMPLATES, entries, has_chat_template, is_template_file, tokenizer_files
from trainer.rules import error


def _sources(cfg: Any) -> list:
    return entries(cfg) if (cfg.data.sources or cfg.data.path is not None) else []


def _bad_caps(cfg: Any) -> list:
    """'key=value' for each max_samples below 1 (data.max_samples or a source's own)."""
    return [f"{s['where']}.max_samples={s['max_samples']}" for s in _sources(cfg)
            if s["max_samples"] is not None and s["max_samples"] < 1]


def _bad_template(cfg: Any) -> bool:
    template = str(cfg.data.template)
    return template != "auto" and template not in NAMED_TEMPLATES and not is_template_file(template)


def _chat_without_template(cfg: Any) -> bool:
    if str(cfg.data.template) != "auto" or not any(s["format"] == "sharegpt" for s in _sources(cfg)):
        return False
    directory = tokenizer_files(cfg)
    return directory is not None and has_chat_template(directory) is False


def _unknown_columns(cfg: Any) -> bool:
    return any(key not in ALL_FIELDS for s in _sources(cfg) for key in s["columns"])


RULES = [
    error(
        "data.one_source",
        ["data"],
        lambda cfg: bool(cfg.data.sources) and cfg.data.path is not None,
        "data.path and data.sources are both set; a run reads either one source or a mixture.",
        "use data.path=... for one source, or data=mix with data.sources=[...] (data.path=null).",
    ),
    error(
        "data.empty_mixture",
        ["data"],
        lambda cfg: not cfg.data.sources and cfg.data.path is None,
        "the data mixture is empty: data.sources lists no source and data.path is unset.",
        "list at least one source, e.g. data.sources=[{{path: /data/a.jsonl}}], or set data.path.",
    ),
    error(
        "data.weights",
        ["data"],
        lambda cfg: bool(cfg.data.sources) and (any(s.weight < 0 for s in cfg.data.sources)
                                                or not sum(s.weight for s in cfg.data.sources) > 0),
        "data.sources weights must be non-negative and sum to a positive number.",
        "give each source a weight >= 0 (its share of the training mixture), at least one of them > 0.",
    ),
    error(
        "data.max_samples",
        ["data"],
        lambda cfg: bool(_bad_caps(cfg)),
        "{caps} must be null or at least 1.",
        "set it to a positive number of records, or null for all of them.",
        details=lambda cfg: {"caps": ", ".join(_bad_caps(cfg))},
    ),
    error(
        "data.template",
        ["data"],
        _bad_template,
        "data.template={cfg.data.template} is neither a known template nor an existing Jinja file.",
        "use auto (the tokenizer's own), " + ", ".join(NAMED_TEMPLATES) + ", or the path of a Jinja file.",
    ),
    error(
        "data.chat_needs_template",
        ["data", "model"],
        _chat_without_template,
        "the model's tokenizer has no chat template, so data.template=auto cannot render the sharegpt "
        "conversations (a base model).",
        "pick a named template: data.template=chatml (or llama3, qwen2, mistral, alpaca), or a Jinja file.",
    ),
    error(
        "data.columns",
        ["data"],
        _unknown_columns,
        "data.columns maps a field qforge does not read; it would do nothing.",
        "map only " + ", ".join(ALL_FIELDS) + " (qforge's field -> your column).",
    ),
    error(
        "data.num_proc",
        ["data"],
        lambda cfg: cfg.data.num_proc is not None and cfg.data.num_proc < 1,
        "data.num_proc must be at least 1, not {cfg.data.num_proc}.",
        "set data.num_proc=null (automatic) or a number of tokenizer processes.",
    ),
    error(
        "data.streaming_needs_max_steps",
        ["data", "train"],
        lambda cfg: cfg.data.streaming and cfg.do_train and cfg.train.max_steps <= 0,
        "data.streaming=true reads a stream of unknown length, so train.num_epochs cannot end the run.",
        "set train.max_steps=N.",
    ),
    error(
        "data.streaming_eval",
        ["data"],
        lambda cfg: cfg.data.streaming and cfg.do_eval,
        "data.streaming=true has no held-out split to evaluate on.",
        "set do_eval=false (evaluate with a separate, non-streaming run), or data.streaming=false.",
    ),
]
