"""Rules on the run as a whole: model source, training loop, strategy and launcher."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import OmegaConf

from trainer.rules import Rule, error


def _get(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


@dataclass(frozen=True)
class Bound:
    """A number's legal range: [low, high] (or open ends), optionally null or one sentinel value."""

    key: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    nullable: bool = False
    sentinel: Optional[float] = None  # e.g. max_steps=-1: unset
    example: str = ""

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.sentinel is not None and value == self.sentinel:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def allowed(self) -> str:
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {opening}{_num(self.low)}, {_num(self.high)}{closing}"
        elif self.low is not None:
            text = f"{'above' if self.low_open else 'at least'} {_num(self.low)}"
        else:
            text = f"{'below' if self.high_open else 'at most'} {_num(self.high)}"
        if self.sentinel is not None:
            text = f"{_num(self.sentinel)} or {text}"
        return f"null or {text}" if self.nullable else text

    def rule(self) -> Rule:
        return error(
            f"range.{self.key}",
            [self.key.split(".")[0]] if "." in self.key else [],
            lambda cfg: not self.ok(_get(cfg, self.key)),
            f"{self.key} must be {self.allowed()}, not {{value}}.",
            f"set {self.key}={self.example}." if self.example else f"set {self.key} to a value {self.allowed()}.",
            details=lambda cfg: {"value": _get(cfg, self.key)},
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def missing_keys(cfg: Any) -> List[str]:
    """Dotted keys whose value is still Hydra's mandatory marker `???` (e.g. data.path with data=alpaca)."""
    from omegaconf import DictConfig, ListConfig

    found: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for key in keys:
            dotted = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                found.append(dotted)
                continue
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
                walk(child, dotted + ".")

    walk(cfg, "")
    return [k for k in found if not k.startswith("hydra.")]


MISSING_VALUE = Rule(
    "config.missing_value", (), lambda cfg: bool(missing_keys(cfg)),
    "{keys} must be set: the chosen options leave {them} without a value.",
    "set {examples} on the command line (or in an experiment file).",
    details=lambda cfg: {"keys": ", ".join(missing_keys(cfg)),
                         "them": "it" if len(missing_keys(cfg)) == 1 else "them",
                         "examples": " ".join(f"{k}=..." for k in missing_keys(cfg))},
)


# Every number a user can set, with its legal range: a bad value is named with its key, never left to
# a library deep inside the run (a batch of 0, a LoRA rank of 0, a sample cap of -1 that drops a record).
BOUNDS: List[Bound] = [
    Bound("train.batch_size", low=1, example="4"),
    Bound("train.eval_batch_size", low=1, example="8"),
    Bound("train.grad_accum", low=1, example="1"),
    Bound("train.max_seq_len", low=8, example="512"),
    Bound("train.logging_steps", low=1, example="5"),
    Bound("train.eval_steps", low=1, example="50"),
    Bound("train.save_steps", low=1, example="50"),
    Bound("train.save_total_limit", low=0, example="2 (0 keeps every checkpoint)"),
    Bound("train.max_steps", low=1, sentinel=-1, example="-1 (train by train.num_epochs) or a number of steps"),
    Bound("train.num_epochs", low=0, low_open=True, example="1"),
    Bound("train.warmup_ratio", low=0, high=1, high_open=True, example="0.03"),
    Bound("train.weight_decay", low=0, example="0.0"),
    Bound("train.max_grad_norm", low=0, example="1.0 (0 turns clipping off)"),
    Bound("train.lr", low=0, low_open=True, example="2e-4"),
    Bound("peft.r", low=1, example="16"),
    Bound("peft.alpha", low=0, low_open=True, example="32"),
    Bound("peft.dropout", low=0, high=1, high_open=True, example="0.05"),
    Bound("peft.oft_block_size", low=0, example="0 (the block size follows peft.r)"),
    Bound("peft.freeze_trainable_layers", low=1, example="2"),
    Bound("peft.pissa_iters", low=1, example="16"),
    Bound("quant.group_size", low=1, example="64"),
    Bound("data.eval_fraction", low=0, high=1, high_open=True, example="0.1"),
    Bound("seed", low=0, example="42"),
    Bound("eval.samples", low=0, example="4 (0: none)"),
    Bound("eval.max_new_tokens", low=1, example="128"),
    Bound("launcher.nnodes", low=1, example="1"),
    *(Bound(f"model.tiny.{k}", low=1, nullable=True, example="the default in trainer/schema.py")
      for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings")),
]

RULES = [
    MISSING_VALUE,
    error(
        "model.one_source",
        ["model"],
        lambda cfg: (cfg.model.name_or_path is None) == (cfg.model.tiny is None),
        "the model needs exactly one source: model.name_or_path or the embedded model.tiny.",
        "pick model=tiny, or a preset such as model=llama3_8b, or model=local model.name_or_path=/path.",
    ),
    error(
        "model.device_map_inference_only",
        ["model"],
        lambda cfg: cfg.model.device_map is not None and cfg.do_train,
        "model.device_map=auto splits one model over devices for inference and cannot train.",
        "set model.device_map=null and use a strategy (fsdp, zero3) to spread training over GPUs.",
    ),
    *(bound.rule() for bound in BOUNDS),
    error(
        "data.eval_needs_split",
        ["data"],
        lambda cfg: cfg.do_eval and cfg.data.eval_fraction == 0,
        "do_eval=true needs a held-out split, but data.eval_fraction=0.",
        "set data.eval_fraction=0.1, or do_eval=false.",
    ),
    error(
        "eval.samples_needs_eval",
        ["eval", "data"],
        lambda cfg: cfg.eval.samples > 0 and not cfg.do_eval,
        "eval.samples={cfg.eval.samples} answers held-out prompts, but do_eval=false holds none out.",
        "set do_eval=true (with data.eval_fraction > 0), or eval.samples=0.",
    ),
    error(
        "train.compile_fused_lora",
        ["train"],
        lambda cfg: cfg.train.compile and cfg.train.fused_lora is True,
        "train.compile=true and train.fused_lora=true exclude each other: the fused LoRA branch keeps Python-side "
        "recompute state that breaks the compiled graph, and under compile inductor fuses peft's LoRA branch itself.",
        "set train.fused_lora=null (off under compile), or train.compile=false to keep the fused branch.",
    ),
    error(
        "run.nothing_to_do",
        [],
        lambda cfg: not cfg.do_train and not cfg.do_eval,
        "do_train=false and do_eval=false leave nothing to run.",
        "set do_train=true or do_eval=true.",
    ),
]
