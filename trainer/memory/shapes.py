"""The model's shape, from its config.json: a local dir's, the local Hugging Face cache's, or the copy shipped for
each preset in trainer/assets/model_configs/ (the embedded tiny model's from model.tiny). No weight is read."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

PRESET_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "model_configs"


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    experts: int = 0  # mixture of experts: experts per layer (their MLPs are counted; activations approximate)
    # The checkpoint's own quantization_config (GPTQ/AWQ/AQLM/...), as sorted (key, value) pairs.
    quantization: Tuple[Tuple[str, Any], ...] = ()

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> List[Tuple[str, int, int]]:
        """(name, in_features, out_features) of one decoder layer's linear layers (an MoE layer's experts)."""
        h, i = self.hidden, self.intermediate
        mlp = [("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
        if self.experts:
            mlp = [(n, a, b) for n, a, b in mlp for _ in range(self.experts)]
        return [("q_proj", h, self.q_width), ("k_proj", h, self.kv_width), ("v_proj", h, self.kv_width),
                ("o_proj", self.q_width, h), *mlp]

    def describe(self) -> str:
        return (f"{self.model_type}: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads}/{self.kv_heads} heads, vocab {self.vocab}" + (", tied head" if self.tied else "")
                + (f", {self.experts} experts" if self.experts else ""))


def shape_from_config(config: Dict[str, Any]) -> ModelShape:
    """A ModelShape from a transformers config.json dict (a multimodal one's text_config)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 1)
    model_type = str(text.get("model_type") or config.get("model_type") or "unknown")
    quant = config.get("quantization_config") or {}
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 0)
    inter = int(text.get("moe_intermediate_size") or text["intermediate_size"]) if experts else \
        int(text["intermediate_size"])
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        intermediate=inter,
        layers=int(text["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        vocab=int(text["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        # Qwen2's q/k/v projections always carry a bias; Llama's only with attention_bias.
        qkv_bias=model_type == "qwen2" or bool(text.get("attention_bias", False)),
        experts=experts,
        quantization=tuple(sorted((str(k), _hashable(v)) for k, v in quant.items())) if isinstance(quant, dict)
        else (),
    )


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


@functools.lru_cache(maxsize=64)
def _read_config(path: str, mtime: float) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _config_at(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return _read_config(str(path), path.stat().st_mtime)
    except OSError:
        return None


def _hub_cache_config(repo_id: str) -> Optional[Path]:
    """config.json of a hub id already in the local Hugging Face cache (nothing is downloaded)."""
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE"),
             os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None,
             os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")]
    folder = "models--" + repo_id.replace("/", "--")
    for root in filter(None, roots):
        base = Path(root) / folder
        ref = base / "refs" / "main"
        try:
            if ref.is_file():
                candidate = base / "snapshots" / ref.read_text().strip() / "config.json"
                if candidate.is_file():
                    return candidate
            snapshots = base / "snapshots"
            if snapshots.is_dir():
                for snapshot in sorted(snapshots.iterdir()):
                    if (snapshot / "config.json").is_file():
                        return snapshot / "config.json"
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _tokenizer_vocab() -> int:
    """len(tokenizer) of the shipped tokenizer (what trainer.tiny sizes the embedded model's vocabulary by)."""
    from trainer.tiny import TOKENIZER_DIR

    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    ids = set(data["model"]["vocab"].values()) | {int(t["id"]) for t in data.get("added_tokens", [])}
    return len(ids)


def _readable_config(source: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """The config.json of `source` where this machine can read it (a local dir, or a hub id in the local Hugging
    Face cache), and where it was found; (None, "") otherwise."""
    local = Path(os.path.expanduser(source))
    if (local / "config.json").is_file():
        config = _config_at(local / "config.json")
        if config is not None:
            return config, f"config.json in {source}"
    cached = _hub_cache_config(source) if source.count("/") == 1 and not local.exists() else None
    if cached is not None:
        config = _config_at(cached)
        if config is not None:
            return config, f"{source}'s config.json in the local Hugging Face cache"
    return None, ""


def model_config(cfg: Any) -> Optional[Dict[str, Any]]:
    """model.name_or_path's config.json where this machine can read it; None otherwise (the tiny model, a path
    elsewhere)."""
    source = cfg.model.name_or_path
    return None if source is None else _readable_config(str(source))[0]


def find_shape(cfg: Any) -> Tuple[Optional[ModelShape], str]:
    """The model's shape and where it came from; (None, why) when no config.json can be read here."""
    model = cfg.model
    source = model.name_or_path
    if source is None:
        tiny = model.tiny
        if tiny is None:
            return None, "unknown: neither model.name_or_path nor model.tiny is set"
        config = {"model_type": "llama", "hidden_size": tiny.hidden_size,
                  "intermediate_size": tiny.intermediate_size, "num_hidden_layers": tiny.num_hidden_layers,
                  "num_attention_heads": tiny.num_attention_heads, "num_key_value_heads": tiny.num_key_value_heads,
                  "vocab_size": _tokenizer_vocab(), "tie_word_embeddings": False}
        return shape_from_config(config), "the embedded tiny model (model.tiny)"
    source = str(source)
    config, where = _readable_config(source)
    if config is not None:
        return _checked(config, where)
    preset = PRESET_CONFIGS / f"{model.preset}.json"
    if preset.is_file():
        config = _config_at(preset)
        if config is not None:
            hub = config.get("_hub_id", "?")
            where = f"preset {model.preset}: the shipped config.json of {hub}"
            if source != hub:  # e.g. a cluster path this machine cannot see: say whose shape this is
                where += f" ({source} is not readable here)"
            return _checked(config, where)
    return None, (f"unknown: no config.json at {source} (not a local directory, not in the local Hugging Face "
                  "cache) and no shipped preset")


def _checked(config: Dict[str, Any], where: str) -> Tuple[Optional[ModelShape], str]:
    try:
        return shape_from_config(config), where
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        return None, f"unknown: {where} lacks a decoder shape ({type(err).__name__}: {err})"


