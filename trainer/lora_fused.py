"""The LoRA branch as one autograd function: same output and gradients, less memory and fewer passes.

peft computes `result.clone() + lora_B(lora_A(dropout(x))) * scaling`. For backward that keeps, per
adapted linear layer, a dropped-out copy of the layer input and its dropout mask (3 bytes per input
element in bf16) and it makes three full-width elementwise passes (clone, scale, add) over the output.
On a Llama-3-8B layer at 8k tokens the copies are ~0.9 GiB, which is what decides how many layers can
skip activation checkpointing.

Here, instead:
- the dropout mask is drawn from the RNG into a fresh tensor, and drawn again in backward from the same
  RNG state (the way activation checkpointing replays dropout), so only the input x is kept, which q/k/v
  and gate/up share and which the layer keeps anyway;
- the 1/(1-p) dropout scale and the LoRA scaling are applied to the rank-r activations (N x r), not to
  the full-width input or output;
- the base result is added inside the second GEMM (addmm), so no clone and no separate add.

Only vanilla LoRA on peft's Linear / bnb / HQQ layers with one active adapter and no LoRA bias takes this
path; anything else (DoRA, mixed adapter batches, merged or disabled adapters) runs peft's own forward.
ZeRO-3 gathers a weight only inside its own module's forward, so it keeps peft's path (speed.py).
"""

from __future__ import annotations

import types
from typing import Any, Optional, Tuple

import torch

# peft's LoRA layer classes whose forward is `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`.
FUSABLE_CLASSES = ("Linear", "Linear4bit", "Linear8bitLt", "HqqLoraLinear")


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A fresh contiguous 0/1 tensor shaped like `like`: the same RNG state always draws the same mask.

    Drawn into a new tensor rather than by dropout on `like` itself, because the dropout kernel's
    element-to-random-number mapping depends on the input's alignment; a fresh allocation's does not.
    """
    return torch.empty(like.shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p)


def _replay_mask(like: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
    """The mask forward drew, drawn again from its saved RNG state; the caller's RNG is left untouched."""
    device = like.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        return _keep_mask(like, p)


class LoraBranch(torch.autograd.Function):
    """result + (dropout(x) @ A^T) @ B^T * scaling, keeping only x, the RNG state and the N x r activations."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                p: float, scaling: float) -> torch.Tensor:
        # Explicit dtypes instead of autocast: everything computes in the base layer's output dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return LoraBranch._forward(ctx, result, x, weight_a, weight_b, p, scaling)

    @staticmethod
    def _forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                 p: float, scaling: float) -> torch.Tensor:
        dtype = result.dtype
        xc = x.to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        state: Optional[torch.Tensor] = None
        if p > 0.0:
            state = _rng_state(x.device)
            dropped = xc * _keep_mask(xc, p)
        else:
            dropped = xc
        # dropout's 1/(1-p) and the LoRA scaling, both on the rank-r activations.
        hidden = (dropped.reshape(-1, dropped.shape[-1]) @ a.t()).mul_(scaling / (1.0 - p))
        del dropped
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b.t())
        ctx.save_for_backward(xc, weight_a, weight_b, hidden)
        ctx.p, ctx.state, ctx.scale = p, state, scaling / (1.0 - p)
        ctx.x_dtype = x.dtype
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        xc, weight_a, weight_b, hidden = ctx.saved_tensors
        dtype = hidden.dtype
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        grad2d = grad.reshape(-1, grad.shape[-1]).to(dtype)
        mask = _replay_mask(xc, ctx.p, ctx.state) if ctx.p > 0.0 else None
        grad_hidden = (grad2d @ b).mul_(ctx.scale)  # N x r
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_b = (grad2d.t() @ hidden).to(weight_b.dtype)
        if ctx.needs_input_grad[2]:
            dropped = xc * mask if mask is not None else xc
            grad_a = (grad_hidden.t() @ dropped.reshape(-1, xc.shape[-1])).to(weight_a.dtype)
            del dropped
        if ctx.needs_input_grad[1]:
            grad_x = (grad_hidden @ a).view(xc.shape)
            if mask is not None:
                grad_x.mul_(mask)
            grad_x = grad_x.to(ctx.x_dtype)
        grad_result = grad if ctx.needs_input_grad[0] else None
        return grad_result, grad_x, grad_a, grad_b, None, None


def _fusable(layer: Any, kwargs: dict) -> Optional[str]:
    """The adapter name when this call can take the fused path, else None (peft's forward runs)."""
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A.keys()]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
        return None
    if not isinstance(layer.lora_A[name], torch.nn.Linear):
        return None
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fusable(self, kwargs)
    if name is None:
        return self._qforge_peft_forward(x, *args, **kwargs)
    for key in ("alora_offsets",):  # variant-only keyword arguments peft strips before the base layer
        kwargs.pop(key, None)
    result = self.base_layer(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    return LoraBranch.apply(result, x, self.lora_A[name].weight, self.lora_B[name].weight, p,
                            float(self.scaling[name]))


def install(model: Any) -> int:
    """Route every fusable peft LoRA layer through LoraBranch; returns how many layers were switched."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or type(module).__name__ not in FUSABLE_CLASSES:
            continue
        if not type(module).__module__.startswith("peft.tuners.lora"):
            continue
        if hasattr(module, "_qforge_peft_forward"):
            continue
        module._qforge_peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        switched += 1
    return switched
