"""Microbenchmark of PyTorch SDPA's backends on the bench's attention shapes (Llama-3-8B: 32 heads, 8 kv heads,
head dim 128, bf16, causal), forward + backward, the way transformers calls it.

    python -m bench.sdpa_bench      # on the GPU machine; prints ms per forward+backward and the error vs math

Shapes: a (4 rows of 2048), L (one row of 16384), and b-like packed rows (4 rows of 2048, each holding several
examples, so transformers passes a block-diagonal bool mask and repeats k/v to every head). "default" is torch's own
priority order; each named backend is tried alone, or "preferred" first in torch's order (model.sdpa_backend).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.lora_kernels_bench import timed

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def packed_mask(rows: int, seq: int, examples: int) -> torch.Tensor:
    """Block-diagonal causal bool mask (True = attend), `examples` equal examples per row."""
    ids = torch.arange(seq, device="cuda") * examples // seq
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
    same = ids[:, None] == ids[None, :]
    return (causal & same).expand(rows, 1, seq, seq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
         grad: torch.Tensor) -> List[torch.Tensor]:
    for t in (q, k, v):
        t.grad = None
    out = attention(q, k, v, mask)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def kernels(fn: Callable[[], Any]) -> str:
    """The attention kernels one call launches (which backend torch's order picked)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("flash", "fmha", "cudnn", "sdpa",
                                                                                       "attention", "mha"))}
    return "; ".join(sorted(name[:80] for name in names)) or "no attention kernel by name"


CHOICES = (("default", None, False), ("flash", [SDPBackend.FLASH_ATTENTION], False),
           ("cudnn", [SDPBackend.CUDNN_ATTENTION], False),
           ("efficient", [SDPBackend.EFFICIENT_ATTENTION], False),
           ("cudnn preferred", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], True))


def shape(name: str, rows: int, seq: int, examples: Optional[int]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(rows, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(rows, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(rows, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = packed_mask(rows, seq, examples) if examples else None

    def run() -> List[torch.Tensor]:
        return step(q, k, v, mask, grad)

    reference = None
    for label, backends, priority in CHOICES:
        try:
            with contextlib.nullcontext() if backends is None else sdpa_kernel(backends, set_priority=priority):
                result = run()
                ms = timed(run, repeat=10)
                picked = kernels(run)
        except RuntimeError as error:
            print(f"{name}: {label}: not available ({str(error).splitlines()[0][:120]})", flush=True)
            continue
        reference = result if reference is None else reference
        diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(result, reference))
        print(f"{name} [{rows}x{seq}{', mask' if mask is not None else ''}]: {label}: {ms:.2f} ms fwd+bwd, "
              f"max |diff| vs default {diff:.4f}; kernels: {picked}", flush=True)


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), "cuDNN", torch.backends.cudnn.version(), flush=True)
    for name, rows, seq, examples in (("a", 4, 2048, None), ("L", 1, 16384, None), ("b-like", 4, 2048, 8)):
        shape(name, rows, seq, examples)


if __name__ == "__main__":
    main()
