"""The LoRA branch as one autograd function: same output and gradients, less memory and fewer passes.

peft computes `result.clone() + lora_B(lora_A(dropout(x))) * scaling`. For backward that keeps, per
adapted linear layer, a dropped-out copy of the layer input and its dropout mask (3 bytes per input
element in bf16) and it makes three full-width elementwise passes (clone, scale, add) over the output.
On a Llama-3-8B layer at 8k tokens the copies are ~0.9 GiB, which is what decides how many layers can
skip activation checkpointing.

Here, instead:
- the dropout mask is never stored. On CUDA it is drawn from (seed, element index) inside the three
  rank-r products (lora_kernels.py), so it is not even materialised; elsewhere it is drawn into a fresh
  tensor and drawn again in backward from the saved RNG state (as activation checkpointing replays
  dropout). Only the input x is kept, which q/k/v and gate/up share;
- when x is a cheap function of tensors autograd keeps anyway (a norm's output: its input is kept by the
  norm; the SwiGLU product: gate and up are kept by the activation), even x is not kept: backward
  recomputes it (`remember` / `Recompute` below);
- the 1/(1-p) dropout scale and the LoRA scaling are applied to the rank-r activations (N x r);
- the base result is added inside the second GEMM (addmm), so no clone and no separate add; where the base
  result is this node's own (QLoraLinear4bit), into it in place, which also skips addmm's copy of it (one
  output-sized device-to-device copy per projection per forward and recompute: 31 GiB a step of work a).

Over a bitsandbytes 4-bit base layer the base product joins the same node (QLoraLinear4bit, bnb4_base.py), which
skips bitsandbytes' own autograd function and its Python per call.

Only vanilla LoRA on peft's Linear / bnb / HQQ layers with one active adapter and no LoRA bias takes this
path; anything else (DoRA, mixed adapter batches, merged or disabled adapters) runs peft's own forward.
ZeRO-3 gathers a weight only inside its own module's forward, so it keeps peft's path (speed.py).
"""

from __future__ import annotations

import os
import types
from typing import Any, Callable, Optional, Tuple

import torch

from trainer import bnb4_base

# peft's LoRA layer classes whose forward is `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`.
FUSABLE_CLASSES = ("Linear", "Linear4bit", "Linear8bitLt", "HqqLoraLinear")
# MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class Recompute:
    """How to make a tensor again, in backward, from tensors autograd keeps anyway.

    Attached to a tensor by `remember` (with its inputs); a LoraBranch that would save that tensor saves
    the inputs instead, through save_for_backward, so activation checkpointing still sees and drops
    them. Several branches share one input (q/k/v, gate/up): the first backward recomputes, the others
    reuse the value, and the last one drops it.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], like: torch.Tensor):
        self.fn = fn
        self.shape, self.dtype = like.shape, like.dtype
        self.autocast = (like.device.type, torch.is_autocast_enabled(like.device.type),
                         torch.get_autocast_dtype(like.device.type))
        self.users = 0
        self.value: Optional[torch.Tensor] = None

    def get(self, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.value is None:
            device_type, enabled, dtype = self.autocast
            global _RECOMPUTING
            _RECOMPUTING = True
            try:
                with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    value = self.fn(*inputs)
            finally:
                _RECOMPUTING = False
            if value.shape != self.shape or value.dtype != self.dtype:
                raise RuntimeError(f"recomputed activation is {value.dtype}{tuple(value.shape)}, "
                                   f"forward had {self.dtype}{tuple(self.shape)}")
            self.value = value
        return self.value

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.value = None


_RECOMPUTING = False


def remember(output: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """Mark `output` as `fn(*inputs)`, so LoRA branches consuming it keep the recipe, not the tensor."""
    if not _RECOMPUTING and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
        output._qforge_recompute = (Recompute(fn, output), inputs)
    return output


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


# The fused branch pays when a call carries enough work to hide its Python and launch cost: with less
# (small models or few tokens per step) training is CPU-bound and peft's forward, which runs fewer ops
# from Python, is faster. Measured on an H200 (bench/RESULTS.md): Llama-3-8B at 8k tokens per step
# (8192 x 4096 = 2**25) gains, Llama-3.2-1B at 8k tokens (8192 x 2048) loses; on CPU the embedded tiny
# model runs 18% slower with it. train.fused_lora=null applies this; true forces the branch everywhere.
MIN_TOKENS_X_HIDDEN = int(os.environ.get("QFORGE_FUSED_LORA_MIN_WORK", 2**25))


# A bitsandbytes 4-bit base layer and the branch run as one autograd node (QLoraLinear4bit). Same kernels and
# values; QFORGE_FUSED_4BIT_BASE=0 keeps bitsandbytes' own matmul, for a before/after measurement.
FUSE_4BIT_BASE = os.environ.get("QFORGE_FUSED_4BIT_BASE", "1") != "0"


def pays(hidden_size: int, tokens_per_step: int) -> bool:
    """Whether a training step carries enough work per LoRA call for the fused branch (see above)."""
    return hidden_size * tokens_per_step >= MIN_TOKENS_X_HIDDEN


def _use_kernels(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or x.numel() >= 2**31:
        return False
    try:
        from trainer import lora_kernels  # noqa: F401  (Triton ships with CUDA builds of torch)
    except ImportError:
        return False
    return True


class LoraBranch(torch.autograd.Function):
    """result + (dropout(x) @ A^T) @ B^T * scaling, keeping x (or its recipe), a seed and the N x r activations."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                p: float, scaling: float) -> torch.Tensor:
        # Explicit dtypes instead of autocast: everything computes in the base layer's output dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return LoraBranch._forward(ctx, result, x, weight_a, weight_b, p, scaling)

    @staticmethod
    def _forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                 p: float, scaling: float, owns_result: bool = False) -> torch.Tensor:
        """owns_result: `result` is a fresh tensor nothing else reads, so the branch is added into it in place."""
        dtype = result.dtype
        xc = x.to(dtype)
        x2d = xc.reshape(-1, xc.shape[-1])
        rank = weight_a.shape[0]
        # Cast once per call and keep the r x K casts for backward (a few hundred KiB a layer), instead of casting
        # the fp32 adapter weights again there: at 8k-token steps the branch is launch-bound, not FLOP-bound.
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        # Without dropout the Triton kernels have nothing to fuse, and cuBLAS with fewer launches is as fast.
        ctx.kernels = p > 0.0 and _use_kernels(x2d) and x2d.is_contiguous()
        ctx.p, ctx.scale, ctx.x_dtype, ctx.x_shape = p, scaling / (1.0 - p), x.dtype, xc.shape
        ctx.a_dtype, ctx.b_dtype = weight_a.dtype, weight_b.dtype
        ctx.seed = ctx.state = None
        if ctx.kernels:
            from trainer import lora_kernels

            # Drawn from the CPU generator, whose state activation checkpointing restores for its replay.
            ctx.seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            ctx.scale = scaling / (1.0 - lora_kernels.effective_p(p))  # the p the 16-bit draws apply
            a = _pad_rows(a, lora_kernels.padded_rank(rank))
            # dropout's 1/(1-p) and the LoRA scaling, both on the rank-r side
            hidden = lora_kernels.masked_xa(x2d, a, ctx.seed, p)[:, :rank].mul(ctx.scale).to(dtype)
        else:
            if p > 0.0:
                ctx.state = _rng_state(x.device)
                x2d = x2d * _keep_mask(x2d, p)
            hidden = (x2d @ a.t()).mul_(ctx.scale)
        result2d = result.reshape(-1, result.shape[-1])
        # Out of place, addmm first copies `result` into its output (beta=1 reads C); in place it reads it there.
        out = result2d.addmm_(hidden, b.t()) if owns_result and result2d.is_contiguous() else \
            torch.addmm(result2d, hidden, b.t())
        recipe, inputs = getattr(x, "_qforge_recompute", (None, ())) if xc is x else (None, ())
        ctx.recipe = recipe
        if recipe is not None:
            recipe.users += 1
            ctx.save_for_backward(a, b, hidden, *inputs)
        else:
            ctx.save_for_backward(a, b, hidden, xc)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        a, b, hidden, *kept = ctx.saved_tensors  # a: rows padded on the kernel path
        xc = ctx.recipe.get(tuple(kept)) if ctx.recipe is not None else kept[0]
        dtype, rank = hidden.dtype, b.shape[1]
        x2d = xc.reshape(-1, xc.shape[-1])
        grad2d = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_hidden = (grad2d @ b).mul_(ctx.scale)  # N x r
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_b = (grad2d.t() @ hidden).to(ctx.b_dtype)
        if ctx.kernels:
            from trainer import lora_kernels

            grad_hidden = _pad_cols(grad_hidden, a.shape[0])
            if ctx.needs_input_grad[2]:
                grad_a = lora_kernels.masked_dha(grad_hidden, x2d, ctx.seed, ctx.p)[:rank].to(ctx.a_dtype)
            if ctx.needs_input_grad[1]:
                grad_x = lora_kernels.masked_dx(grad_hidden, a, ctx.seed, ctx.p).view(ctx.x_shape)
        else:
            mask = _replay_mask(x2d, ctx.p, ctx.state) if ctx.p > 0.0 else None
            if ctx.needs_input_grad[2]:
                dropped = x2d * mask if mask is not None else x2d
                grad_a = (grad_hidden.t() @ dropped).to(ctx.a_dtype)
                del dropped
            if ctx.needs_input_grad[1]:
                grad_x = grad_hidden @ a
                if mask is not None:
                    grad_x.mul_(mask)
                grad_x = grad_x.view(ctx.x_shape)
        if ctx.recipe is not None:
            ctx.recipe.release()
            ctx.recipe = None
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        grad_result = grad if ctx.needs_input_grad[0] else None
        return grad_result, grad_x, grad_a, grad_b, None, None


class QLoraLinear4bit(torch.autograd.Function):
    """x @ dequant(W)^T + (dropout(x) @ A^T) @ B^T * scaling: a bitsandbytes 4-bit base layer's product and its LoRA
    branch as one autograd node, keeping what LoraBranch keeps and nothing of W.

    Per call this replaces bitsandbytes' MatMul4Bit node (~300 us of Python) and LoraBranch's with one: the weight
    is dequantized by bitsandbytes' kernels called directly (bnb4_base.py), then one GEMM for the base product and
    the branch's rank-r products; backward dequantizes again, as bitsandbytes does, and adds grad @ W into the
    branch's input gradient in place. Same kernels, so the same values.

    Arguments are ordered as LoraBranch's (the packed weight where it has the base result), so its backward,
    which reads ctx.needs_input_grad[1:4], serves this node too.
    """

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                p: float, scaling: float, state: Any, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = compute_dtype or x.dtype
            weight = bnb4_base.dequantize(packed, state, dtype)
            result = torch.nn.functional.linear(x.to(dtype), weight)
            del weight  # the full-size weight lives only for this product, as in bitsandbytes
            # Linear4bit hands back its input's dtype; the branch computes in the result's.
            result = result.to(x.dtype)
            # (not ctx.state: LoraBranch keeps its RNG state there)
            ctx.packed, ctx.quant_state, ctx.compute_dtype = packed, state, dtype
            # `result` is this node's own product (or its cast), not yet seen by anyone: the branch adds into it.
            return LoraBranch._forward(ctx, result, x, weight_a, weight_b, p, scaling, owns_result=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        _, grad_x, grad_a, grad_b, _, _ = LoraBranch.backward(ctx, grad)
        if ctx.needs_input_grad[1]:
            weight = bnb4_base.dequantize(ctx.packed, ctx.quant_state, ctx.compute_dtype)
            grad2d = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            if grad_x is not None and grad_x.dtype == weight.dtype and grad_x.is_contiguous():
                grad_x = grad_x.view(-1, weight.shape[1]).addmm_(grad2d, weight).view(ctx.x_shape)
            else:
                base = (grad2d @ weight).view(ctx.x_shape).to(ctx.x_dtype)
                grad_x = base if grad_x is None else grad_x + base
            del weight
        ctx.packed = ctx.quant_state = None
        return None, grad_x, grad_a, grad_b, None, None, None, None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.shape[1] == cols else torch.cat([t, t.new_zeros(t.shape[0], cols - t.shape[1])], dim=1)


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
    # auto: calls with few tokens (eval batches, a short last batch) go to peft's forward as well.
    small = self._qforge_auto_hidden and not pays(self._qforge_auto_hidden, x.numel() // max(1, x.shape[-1]))
    if name is None or small:
        return self._qforge_peft_forward(x, *args, **kwargs)
    kwargs.pop("alora_offsets", None)  # a variant-only keyword peft strips before the base layer
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    weight_a, weight_b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
    if FUSE_4BIT_BASE and not args and not kwargs:
        base = self.base_layer
        if bnb4_base.applies(base, x):  # a bnb 4-bit base: its product joins the branch's node
            return QLoraLinear4bit.apply(base.weight, x, weight_a, weight_b, p, scaling, base.weight.quant_state,
                                         base.compute_dtype)
    result = self.base_layer(x, *args, **kwargs)
    return LoraBranch.apply(result, x, weight_a, weight_b, p, scaling)


def _remember_norm_output(module: Any, args: Any, output: Any) -> None:
    if args and isinstance(args[0], torch.Tensor):
        remember(output, module, args[0])


def _gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)
    up = self.up_proj(x)
    product = remember(self._qforge_act_mul(gate, up), self._qforge_act_mul, gate, up)
    return self.down_proj(product)


def _act_mul_for(mlp: Any) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The MLP's own act(gate) * up (liger's SwiGLU kernel when liger patched it), or None if unknown."""
    bound = mlp.__dict__.get("forward")
    if bound is not None:
        try:
            from liger_kernel.transformers.swiglu import LigerSwiGLUMLP, _swiglu_dispatch
        except ImportError:
            return None
        return _swiglu_dispatch if getattr(bound, "__func__", None) is LigerSwiGLUMLP.forward else None
    if type(mlp).__name__ in GATED_MLP_CLASSES and hasattr(mlp, "act_fn"):
        return lambda gate, up: mlp.act_fn(gate) * up
    return None


def _install_recompute(model: Any) -> int:
    """Let fused branches recompute norm outputs and the gated-MLP product instead of keeping them."""
    marked = 0
    for module in model.modules():
        if not type(module).__name__.endswith("DecoderLayer"):
            continue
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(module, name, None)
            if norm is not None and not getattr(norm, "_qforge_remembers", False):
                norm.register_forward_hook(_remember_norm_output)
                norm._qforge_remembers = True
                marked += 1
        mlp = getattr(module, "mlp", None)
        down = getattr(mlp, "down_proj", None)
        if mlp is None or not hasattr(down, "_qforge_peft_forward") or hasattr(mlp, "_qforge_act_mul"):
            continue
        act_mul = _act_mul_for(mlp)
        if act_mul is not None:
            mlp._qforge_act_mul = act_mul
            mlp.forward = types.MethodType(_gated_mlp_forward, mlp)
            marked += 1
    return marked


def install(model: Any, auto: bool = False) -> int:
    """Route every fusable peft LoRA layer through LoraBranch; returns how many layers were switched.

    auto: calls with too little work (`pays`) still take peft's forward.
    """
    from peft.tuners.lora import LoraLayer

    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0) or 2**31  # unknown: never "small"
    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or type(module).__name__ not in FUSABLE_CLASSES:
            continue
        if not type(module).__module__.startswith("peft.tuners.lora"):
            continue
        if hasattr(module, "_qforge_peft_forward"):
            continue
        module._qforge_peft_forward = module.forward
        module._qforge_auto_hidden = hidden if auto else 0
        module.forward = types.MethodType(_fused_forward, module)
        switched += 1
    if switched:
        _install_recompute(model)
    return switched
