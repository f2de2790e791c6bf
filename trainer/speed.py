"""The speed pass, in one place: packing, the chunked loss, liger-kernel, the fused LoRA branch, partial
checkpointing.

None of these change what is learned: the same tokens are trained with the same loss (bench/ checks the
first-step loss against plain HF + peft on the same batch). The plan decides (speed_spec, torch-free); the
rank applies what the SpeedSpec says (apply, apply_to_adapter, callbacks); packing is trainer/packing.py,
used by trainer/data/prepare.py.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, List, Optional

from trainer.errors import UserError
from trainer.specs import SpeedSpec

log = logging.getLogger(__name__)

# Liger's patches replace these model types' RMSNorm, SwiGLU MLP and RoPE with Triton kernels.
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral")
# Attention implementations that read packed rows as one flat sequence with per-example positions.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


# ---- plan time (no torch): what the run will do ----

def speed_spec(cfg: Any, checkpoint_layers: Optional[int], offload_layers: Optional[int] = None,
               embeddings_on_host: bool = False, offload_activations: bool = False) -> SpeedSpec:
    """checkpoint_layers, offload_layers, embeddings_on_host, offload_activations: train.checkpoint_layers,
    train.offload_layers, train.embeddings_on_host and train.offload_activations as the plan resolved them (auto and
    null by the memory model)."""
    from trainer.strategies import chosen

    strat = chosen(cfg)
    fused_lora = cfg.train.fused_lora
    return SpeedSpec(
        packing=bool(cfg.train.packing),
        flatten_packed_rows=cfg.model.attn_implementation in VARLEN_ATTENTION,
        fused_cross_entropy=bool(cfg.train.fused_ce) and strat.allows_fused_ce,
        # Under train.compile inductor fuses peft's branch; the fused one would break the graph (compile_layers.py).
        fused_lora="off" if fused_lora is False or not strat.allows_fused_lora or cfg.train.compile
        else ("on" if fused_lora else "auto"),
        liger={None: "auto", True: "on", False: "off"}[cfg.model.liger],
        gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
        checkpoint_layers=checkpoint_layers,
        offload_activations=offload_activations,
        offload_layers=offload_layers,
        tokens_per_step=int(cfg.train.batch_size) * int(cfg.train.max_seq_len),
        compile_layers=bool(cfg.train.compile),
        embeddings_on_host=embeddings_on_host,
    )


# ---- run time: applied to the loaded model, from the spec ----

def liger_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def use_liger(wanted: str, model_type: str) -> bool:
    """model.liger: auto = on when CUDA and liger-kernel are there and the model type is supported."""
    if wanted == "off":
        return False
    supported = model_type in LIGER_MODEL_TYPES
    if wanted == "auto":
        return supported and liger_available()
    if not liger_available():
        raise UserError("model.liger=true needs a CUDA GPU and liger-kernel; `pip install liger-kernel` on a GPU "
                        "machine, or set model.liger=null to use it only where it is available.")
    if not supported:
        raise UserError(f"liger-kernel has no kernels for model type {model_type}; set model.liger=null or false.")
    return True


def apply(model: Any, speed: SpeedSpec, upcast_layernorm: bool) -> Any:
    """Swap in liger kernels and the chunked loss on the loaded (not yet adapted) causal LM."""
    from trainer import fused_loss

    model_type = str(getattr(model.config, "model_type", ""))
    liger = use_liger(speed.liger, model_type)
    if liger and speed.compile_layers:
        # Inductor generates the norm, SwiGLU and RoPE kernels of a compiled layer itself; liger's Triton calls
        # inside it split the graph (3 breaks a layer on an H200). Liger's loss runs outside the layers: kept.
        log.info("liger-kernel: only its cross-entropy under train.compile (inductor fuses the layers' kernels)")
    elif liger:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        # The loss is ours (below): liger's own lce_forward would also replace the forward.
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        log.info("liger-kernel: RMSNorm, SwiGLU and RoPE kernels on %s", model_type)
    if upcast_layernorm:
        _norms_return_input_dtype(model)
    if speed.fused_cross_entropy:
        if fused_loss.install(model, use_liger=liger):
            log.info("loss: chunked linear cross-entropy (%s), no full fp32 logits", "liger" if liger else "torch")
    return model


def apply_to_adapter(model: Any, speed: SpeedSpec) -> Any:
    """After peft has wrapped the model: route vanilla LoRA layers through the fused branch (lora_fused.py), or
    compile the decoder layers (compile_layers.py)."""
    if speed.compile_layers:
        from trainer import compile_layers

        compile_layers.install(model)
        return model
    if speed.fused_lora != "off":
        from trainer import lora_fused

        auto = speed.fused_lora == "auto"
        hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        tokens = speed.tokens_per_step
        if auto and hidden and not lora_fused.pays(hidden, tokens):
            log.info("LoRA: peft's forward (%d tokens x hidden %d per step is too little work for the fused "
                     "branch to pay; train.fused_lora=true forces it)", tokens, hidden)
            return model
        switched = lora_fused.install(model, auto=auto)
        if switched:
            log.info("LoRA: fused branch on %d layers (dropout mask replayed in backward, not stored)", switched)
    return model


def _norms_return_input_dtype(model: Any) -> None:
    """Keep upcast (fp32) norm weights, but hand the next layer the activation dtype it was given.

    An fp32 norm weight times a bf16 activation is an fp32 tensor, and from there every projection input,
    LoRA dropout and saved activation of the layer is fp32: measured 9% slower on a 1B model and more
    memory, for nothing, since each consumer is a matmul that computes in bf16 anyway. The norm itself
    still runs in fp32 inside the module, which is what upcast_layernorm is for.
    """
    def cast_back(module: Any, args: Any, output: Any) -> Any:
        source = args[0] if args else None
        if source is None or not hasattr(output, "dtype") or output.dtype == source.dtype:
            return output
        return output.to(source.dtype)

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_norm(name, module) and weight is not None and weight.dtype.is_floating_point \
                and weight.dtype.itemsize == 4:
            module.register_forward_hook(cast_back)


def is_norm(name: str, module: Any) -> bool:
    """A normalization layer (RMSNorm, LayerNorm, ...): by class name, or by attribute name for custom ones."""
    return "norm" in type(module).__name__.lower() or name.endswith("norm")


def callbacks(speed: SpeedSpec) -> List[Any]:
    """Trainer callbacks the speed settings need (partial checkpointing, then offloading what it keeps; the compile
    report)."""
    found: List[Any] = []
    if speed.compile_layers:
        from trainer import compile_layers

        found.append(compile_layers.report_callback())
    if speed.gradient_checkpointing and speed.checkpoint_layers is not None:
        found.append(_partial_checkpointing(speed.checkpoint_layers, spread_out=speed.offload_activations))
    if speed.offload_activations:
        found.append(_offload_activations(speed.offload_layers))
    return found


def _offload_activations(offload_layers: Optional[int]) -> Any:
    from transformers import TrainerCallback

    class OffloadActivations(TrainerCallback):
        """What the decoder layers keep for backward lives in pinned host memory (trainer/offload.py)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            from trainer.offload import decoder_layers, offload_checkpointed_layers

            layers = decoder_layers(model)
            checkpointed = sum(bool(getattr(m, "gradient_checkpointing", False)) for m in layers)
            wrapped = offload_checkpointed_layers(model, plain_layers=True if offload_layers is None
                                                  else offload_layers)
            kept = len(layers) - wrapped
            log.info("activation offload: %d decoder layers keep their input in host memory (checkpointed), "
                     "%d all their saved activations (no recompute)%s", checkpointed, wrapped - checkpointed,
                     f", {kept} keep theirs on the GPU" if kept else "")

    return OffloadActivations()


def _partial_checkpointing(keep: int, spread_out: bool = False) -> Any:
    from transformers import TrainerCallback

    class PartialCheckpointing(TrainerCallback):
        """Checkpoint only `keep` decoder layers (the first ones); the rest keep their activations.

        The Trainer switches checkpointing on for every layer just before on_train_begin; memory left
        over after the speed pass buys back the recompute (a third of the FLOPs) of the later layers.
        spread_out (activation offload): the checkpointed layers are spread evenly among the offloaded ones, so
        that each offloaded layer's copies overlap a recomputing layer's extra work (trainer/offload.py); the
        offload callback then spreads the layers it offloads whole among the un-checkpointed ones (the others keep
        their activations).
        """

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            from trainer.offload import spread

            layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")
                      and type(m).__name__.endswith("DecoderLayer")]
            chosen = spread(keep, len(layers)) if spread_out else [index < keep for index in range(len(layers))]
            for layer, checkpointed in zip(layers, chosen):
                layer.gradient_checkpointing = checkpointed
            log.info("gradient checkpointing: %d of %d decoder layers%s", sum(chosen), len(layers),
                     " (spread through the stack)" if spread_out else "")

    return PartialCheckpointing()
