"""Rules on how adapters and quantized base weights combine (LLaMA-Factory's and peft's hard limits)."""

from __future__ import annotations

from typing import Any

from trainer.quant import trains_quantized
from trainer.rules import error, peft_method, warning

LORA_FAMILY = ("lora", "dora", "oft", "pissa")


def trains_adapter(method_name: str) -> bool:
    """An adapter method (a PEFT adapter is trained and saved) rather than full or freeze tuning."""
    return method_name in LORA_FAMILY
# Layer names of the decoder families qforge knows (Llama, Mistral and Qwen2 share them).
FAMILY_LAYERS = {family: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                          "embed_tokens", "lm_head") for family in ("llama", "mistral", "qwen2", "qwen3")}


def _family(cfg: Any) -> str:
    """The family the rule can know without reading files: as named, or llama for the embedded tiny model."""
    family = getattr(cfg.model.family, "value", cfg.model.family)
    return "llama" if family == "auto" and cfg.model.name_or_path is None else str(family)


def unknown_targets(cfg: Any) -> list:
    known = FAMILY_LAYERS.get(_family(cfg))
    targets = list(cfg.peft.target_modules)
    if known is None or targets == ["all-linear"] or not trains_adapter(peft_method(cfg)):
        return []
    return [t for t in targets if t not in known]


RULES = [
    error(
        "peft.target_modules",
        ["peft", "model"],
        lambda cfg: bool(unknown_targets(cfg)),
        "peft.target_modules names {unknown}, which no layer of a {family} model is called.",
        "use peft.target_modules=[all-linear], or a list of: {known}.",
        details=lambda cfg: {"unknown": ", ".join(unknown_targets(cfg)), "family": _family(cfg),
                             "known": ", ".join(FAMILY_LAYERS[_family(cfg)])},
    ),
    error(
        "quant.lora_family_only",
        ["quant", "peft"],
        lambda cfg: trains_quantized(cfg) and not trains_adapter(peft_method(cfg)),
        "quantized weights cannot be trained directly, so peft={cfg.peft.method.value} "
        "does not work with quant={cfg.quant.method.value}.",
        "use peft=lora, dora or oft on the quantized model, or quant=none for full or freeze tuning.",
    ),
    error(
        "quant.no_pissa",
        ["quant", "peft"],
        lambda cfg: trains_quantized(cfg) and peft_method(cfg) == "pissa",
        "PiSSA initialises adapters from an SVD of the base weights, which a quantized model "
        "does not hold in full precision.",
        "use peft=lora on the quantized model, or quant=none with peft=pissa.",
    ),
    error(
        "quant.single_adapter",
        ["quant", "model"],
        lambda cfg: trains_quantized(cfg) and len(cfg.model.adapters) > 1,
        "a quantized model accepts one adapter, but model.adapters lists {cfg.model.adapters}.",
        "merge those adapters into the base model first, then load that model with one adapter.",
    ),
    error(
        "quant.no_new_adapter",
        ["quant", "model"],
        lambda cfg: trains_quantized(cfg) and len(cfg.model.adapters) > 0 and cfg.model.new_adapter,
        "a new adapter cannot be stacked on the adapter already loaded onto a quantized model.",
        "set model.new_adapter=false to keep training the loaded adapter, or merge it into the base first.",
    ),
    error(
        "quant.no_resize_vocab",
        ["quant", "model"],
        lambda cfg: trains_quantized(cfg) and cfg.model.resize_vocab,
        "the vocabulary of a quantized model cannot be resized.",
        "set model.resize_vocab=false, or resize with quant=none and quantize afterwards.",
    ),
    error(
        "peft.adapters_need_adapter_method",
        ["peft", "model"],
        lambda cfg: len(cfg.model.adapters) > 0 and not trains_adapter(peft_method(cfg)),
        "model.adapters loads adapters, but peft={cfg.peft.method.value} trains no adapter.",
        "use peft=lora (or dora/oft) to continue those adapters, or clear model.adapters.",
    ),
    warning(
        "quant.eval_in_low_bits",
        ["quant"],
        lambda cfg: trains_quantized(cfg) and cfg.do_eval,
        "evaluating with {cfg.quant.bits}-bit base weights gives lower scores than the 16-bit model would.",
        "for final numbers, evaluate the merged 16-bit model.",
    ),
    warning(
        "quant.upcast_layernorm",
        ["quant", "model"],
        lambda cfg: trains_quantized(cfg) and not cfg.model.upcast_layernorm,
        "quantized training is more stable with layer norms kept in float32.",
        "set model.upcast_layernorm=true.",
    ),
]
