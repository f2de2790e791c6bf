"""A bitsandbytes 4-bit linear layer and its LoRA branch as one autograd node.

On an 8k-token Llama-3-8B step the forward is bound by the CPU, not the GPU (bench/RESULTS.md, run 8): per
adapted layer bitsandbytes' MatMul4Bit spends ~300 us of Python (its autograd function, two custom-op
dispatches into Python kernels, checks) to queue three kernels and a GEMM, and the LoRA branch is a second
autograd node. Here the base product and the branch are one node: the 4-bit weight is dequantized by the same
bitsandbytes kernels, called directly, then one GEMM for the base and the rank-r products of LoraBranch
(lora_fused.py), whose saving and recompute rules it shares. Backward dequantizes the weight again, as
bitsandbytes does, and adds grad @ W into the branch's input gradient in place.

Same kernels, same order of operations: outputs and gradients equal bitsandbytes + the fused branch. Only
bnb Linear4bit base layers without a bias, in a layout bitsandbytes' own training path reads, take it
(`applies`); anything else keeps base_layer(x) + LoraBranch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import torch

from trainer.lora_fused import LoraBranch


@functools.lru_cache(maxsize=1)
def _cuda_kernels() -> Optional[Tuple[Callable[..., None], Callable[..., None]]]:
    """bitsandbytes' CUDA dequantize launchers (blockwise 8-bit, 4-bit), or None where this build has none.

    They are what its `dequantize_4bit` op runs after the dispatcher; calling them directly skips two
    custom-op dispatches into Python per call. Private to bitsandbytes, so looked up defensively: without them
    the public `dequantize_4bit` runs (the same kernels, more overhead).
    """
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:  # noqa: BLE001 (no CUDA library in this build, or a layout this version does not have)
        return None
    blockwise, nf4 = getattr(ops, "_dequantize_blockwise_impl", None), getattr(ops, "_dequantize_4bit_impl", None)
    return (blockwise, nf4) if callable(blockwise) and callable(nf4) else None


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight in `dtype` from the packed 4-bit data and its QuantState (double quant included)."""
    kernels = _cuda_kernels() if packed.is_cuda else None
    if kernels is None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(packed, state).to(dtype)
    blockwise, nf4 = kernels
    absmax = state.absmax
    if state.nested:  # the absmax is itself 8-bit quantized: dequantize it, then add its offset
        nested = state.state2
        unpacked = torch.empty(absmax.shape, dtype=torch.float32, device=absmax.device)
        blockwise(absmax, nested.absmax, nested.code, nested.blocksize, torch.float32, out=unpacked)
        absmax = unpacked.add_(state.offset)
    weight = torch.empty(tuple(state.shape), dtype=dtype, device=packed.device)
    nf4(packed, absmax, state.blocksize, state.quant_type, dtype, out=weight)
    return weight


def applies(base: Any, x: torch.Tensor) -> bool:
    """Whether this base layer can run inside QLoraLinear4bit for input x (else base_layer(x) + LoraBranch)."""
    if type(base).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4") or base.bias is not None:
        return False
    if not type(base).__module__.startswith("bitsandbytes"):
        return False
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)  # FSDP drops the state off the parameter; bnb restores it so
    state = base.weight.quant_state
    if state is None or len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        return False
    # The CPU inference layout (repacked for AVX512-BF16 at eval time) is not what dequantize reads.
    return not getattr(state, "packing_format_for_cpu", False) and x.numel() > 0


class QLoraLinear4bit(torch.autograd.Function):
    """x @ dequant(W)^T + (dropout(x) @ A^T) @ B^T * scaling, keeping what LoraBranch keeps and nothing of W.

    Arguments are ordered as LoraBranch's (the packed weight where it has the base result), so its backward,
    which reads ctx.needs_input_grad[1:4], serves this node too.
    """

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                p: float, scaling: float, state: Any, compute_dtype: Optional[torch.dtype]) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = compute_dtype or x.dtype
            weight = dequantize(packed, state, dtype)
            result = torch.nn.functional.linear(x.to(dtype), weight)
            del weight  # the full-size weight lives only for this product, as in bitsandbytes
            # Linear4bit hands back its input's dtype; the branch computes in the result's.
            result = result.to(x.dtype)
            # (not ctx.state: LoraBranch keeps its RNG state there)
            ctx.packed, ctx.quant_state, ctx.compute_dtype = packed, state, dtype
            return LoraBranch._forward(ctx, result, x, weight_a, weight_b, p, scaling)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        _, grad_x, grad_a, grad_b, _, _ = LoraBranch.backward(ctx, grad)
        if ctx.needs_input_grad[1]:
            weight = dequantize(ctx.packed, ctx.quant_state, ctx.compute_dtype)
            grad2d = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            if grad_x is not None and grad_x.dtype == weight.dtype and grad_x.is_contiguous():
                grad_x = grad_x.view(-1, weight.shape[1]).addmm_(grad2d, weight).view(ctx.x_shape)
            else:
                base = (grad2d @ weight).view(ctx.x_shape).to(ctx.x_dtype)
                grad_x = base if grad_x is None else grad_x + base
            del weight
        ctx.packed = ctx.quant_state = None
        return None, grad_x, grad_a, grad_b, None, None, None, None


def forward(base: Any, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, p: float,
            scaling: float) -> torch.Tensor:
    """base_layer(x) + LoRA branch through one node; call only where `applies(base, x)`."""
    return QLoraLinear4bit.apply(base.weight, x, weight_a, weight_b, p, scaling, base.weight.quant_state,
                                 base.compute_dtype)
