"""The command line before any rule runs: Hydra's composition errors as one qforge line, and what Hydra lets
through that the schema does not have.

Hydra prints a composition error over 5-18 lines and sometimes suggests a harmful fix ("To append to your
config use +quant.bitz=4"). Here each kind becomes one sentence naming the key or choice, the closest valid one,
and what to type instead. Hydra also composes some overrides that do nothing: `+key=value` adds a key past the
schema, an unknown `experiment=` is skipped because the group is optional, `~quant` drops a group's defaults,
`quant=[bnb4,bnb8]` merges two options. Those are refused too, after composition.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from trainer.errors import UserError
from trainer.schema import RunConfig

# Config groups (conf/<group>/) a user picks one option of; `experiment` alone may be left out.
GROUPS = ("model", "quant", "peft", "strategy", "data", "logger", "launcher", "experiment")
OPTIONAL_GROUPS = ("experiment",)
KEYS_HINT = "`python train.py --cfg job` prints every key"


class CompositionError(UserError):
    """A command line Hydra cannot compose, or composes into something the schema does not have."""

    exit_code = 2


@functools.lru_cache(maxsize=4)
def schema_keys(schema: type = RunConfig) -> Dict[str, Any]:
    """Every dotted key of the schema -> its annotated type (nested dataclasses walked, Optional ones too)."""
    found: Dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            kind = _unwrap_optional(hints[f.name])
            found[key] = kind
            if dataclasses.is_dataclass(kind):
                walk(kind, key + ".")

    walk(schema, "")
    return found


def _unwrap_optional(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind


def options(conf_dir: str, group: str) -> List[str]:
    return sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml"))


def closest(word: str, candidates: Iterable[str]) -> Optional[str]:
    candidates = list(candidates)
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not match:
        # A misspelled last part of a dotted key: compare leaf names under the same parent.
        parent, _, leaf = word.rpartition(".")
        siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
        leaves = difflib.get_close_matches(leaf, [c.rpartition(".")[2] for c in siblings], n=1, cutoff=0.5)
        match = [f"{parent}.{leaves[0]}" if parent else leaves[0]] if leaves else []
    return match[0] if match else None


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _suggest(word: str, candidates: Iterable[str]) -> str:
    match = closest(word, candidates)
    return f" (did you mean {match}?)" if match else ""


def explain(err: BaseException, conf_dir: str, schema: type = RunConfig) -> Optional[str]:
    """One line for a Hydra/OmegaConf composition error, or None when it is not one (a real bug).

    `schema`: the structured config composed (train.py's RunConfig, the export's ExportRunConfig)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = _innermost_config_error(err)
    where = _config_file(err)
    if isinstance(err, OverrideParseException):
        text = str(err).splitlines()[0].removeprefix("Error parsing override ").strip()
        return (f"cannot read the override {text}: each override is key=value (or group=option), e.g. "
                "quant.bits=4 or quant=bnb8; quote values holding spaces or '=' ('data.path=\"a b.jsonl\"').")
    if isinstance(err, MissingConfigException):
        missing = str(getattr(err, "missing_cfg_file", "") or "")
        group, _, choice = missing.partition("/")
        if group in GROUPS:
            listed = getattr(err, "options", None) or options(conf_dir, group)
            return (f"{group}={choice} is not {_a(group)} option{_suggest(choice, listed)}; "
                    f"the {group} options are: {', '.join(listed)}.")
        return None
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return where + unknown_key_message(str(cause.full_key), schema)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return where + bad_value_message(str(cause.full_key), cause, schema)
    if isinstance(err, ConfigCompositionException):
        first = str(err).splitlines()[0]
        if "Could not append to config. An item is already at" in first:
            key = first.split("'")[1] if "'" in first else "that key"
            return f"+{key}=... adds a key that is already set; drop the '+' and write {key}=<value>."
        if first.startswith("Multiple values for"):
            group = first.removeprefix("Multiple values for ").split(".")[0].strip()
            return f"+{group}=... adds a second {group}; pick one with {group}=<option> (no '+')."
        return f"the command line does not compose: {first}"
    return None


def _innermost_config_error(err: BaseException) -> BaseException:
    """The OmegaConf error under Hydra's wrappers (a key error can sit two causes deep)."""
    found: BaseException = err.__cause__ or err.__context__ or err
    seen = 0
    while not getattr(found, "full_key", None) and (found.__cause__ or found.__context__) and seen < 5:
        found, seen = found.__cause__ or found.__context__, seen + 1  # type: ignore[assignment]
    return found


def _config_file(err: BaseException) -> str:
    """'in data/mymix.yaml: ' when the error is in a config file rather than on the command line."""
    first = str(err).splitlines()[0] if str(err) else ""
    if first.startswith("In '") and "'" in first[4:]:
        return f"in {first[4:].split(chr(39))[0]}.yaml: "
    return ""


def unknown_key_message(key: str, schema: type = RunConfig) -> str:
    return (f"{key} is not a setting{_suggest(key, schema_keys(schema))}; qforge accepts only the keys of its "
            f"schema ({KEYS_HINT}).")


def bad_value_message(key: str, cause: Any, schema: type = RunConfig) -> str:
    kind = schema_keys(schema).get(key)
    value = getattr(cause, "value", None)
    shown = f"{key}={value}" if value is not None else key
    import enum

    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        choices = [m.value for m in kind]
        return (f"{shown} is not one of {', '.join(map(str, choices))}"
                f"{_suggest(str(value), map(str, choices))}; set {key} to one of those.")
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    wanted = names.get(kind, getattr(kind, "__name__", str(kind)))
    return f"{shown} is not {wanted}; set {key} to {wanted}."


def check_composed(cfg: Any, overrides: Sequence[str], choices: Dict[str, Any], conf_dir: str) -> None:
    """After Hydra composed: refuse what it let through that does nothing or is not in the schema."""
    for override in overrides:
        text = override.strip()
        key = text.lstrip("+~").split("=", 1)[0].strip()
        if text.startswith("~") and key.split(".")[0] not in OPTIONAL_GROUPS:
            raise CompositionError(f"{text} removes {key}, which every run needs; choose another value with "
                                   f"{key}=<value> instead (e.g. quant=none for no quantization).")
        if key in GROUPS and "=" in text:
            value = text.split("=", 1)[1].strip()
            if value.startswith("["):
                raise CompositionError(f"{text} picks several {key} options at once; pick one ({key}=<option>), "
                                       f"or sweep them with -m {key}={value.strip('[]')}.")
    for group in OPTIONAL_GROUPS:
        chosen = choices.get(group)
        if chosen and not (Path(conf_dir) / group / f"{chosen}.yaml").is_file():
            listed = options(conf_dir, group)
            raise CompositionError(f"{group}={chosen} is not {_a(group)} option{_suggest(str(chosen), listed)}; "
                                   f"the {group} options are: {', '.join(listed)}.")
    extra = unknown_keys(cfg)
    if extra:
        raise CompositionError(f"{extra[0]} is not a setting{_suggest(extra[0], schema_keys())}; a '+' override "
                               f"cannot add keys the schema does not have ({KEYS_HINT}).")


def unknown_keys(cfg: Any) -> List[str]:
    """Dotted keys present in the composed config that the schema does not declare (hydra's own node aside)."""
    from omegaconf import DictConfig

    known = schema_keys()
    found: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        for key in node.keys() if isinstance(node, DictConfig) else ():
            dotted = f"{prefix}{key}"
            if dotted == "hydra":
                continue
            if dotted not in known:
                found.append(dotted)
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                walk(child, dotted + ".")

    walk(cfg, "")
    return found
