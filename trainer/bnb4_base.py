"""A bitsandbytes 4-bit base layer read directly: which layers qualify, and their weight dequantized.

lora_fused.QLoraLinear4bit runs a bnb Linear4bit's product inside the LoRA branch's autograd node, which skips
bitsandbytes' MatMul4Bit (its autograd function, two custom-op dispatches into Python kernels and checks: ~300 us
of Python per call in the profile of bench/RESULTS.md run 8). This module is what it needs of bitsandbytes: the
weight dequantized by bitsandbytes' own kernels, called directly, and which base layers it can read that way.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import torch


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
    """Whether this base layer's product can run inside lora_fused.QLoraLinear4bit for input x (a bnb Linear4bit
    without a bias, in the layout bitsandbytes' own training path reads); else base_layer(x) + LoraBranch."""
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
