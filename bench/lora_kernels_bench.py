"""Microbenchmark of the LoRA-branch products on CUDA: torch (mask tensor + cuBLAS) vs the Triton kernels.

    python -m bench.lora_kernels_bench      # on the GPU machine; prints ms per call for Llama-3-8B widths
"""

from __future__ import annotations

import functools
import statistics
from typing import Callable

import torch

P, SEED, RANK = 0.05, 7, 16


def timed(fn: Callable[[], object], repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_forward(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (x * torch.empty_like(x).bernoulli_(1 - P)) @ a.t()


def torch_backward(x: torch.Tensor, a: torch.Tensor, dh: torch.Tensor) -> tuple:
    mask = torch.empty_like(x).bernoulli_(1 - P)
    return dh.t() @ (x * mask), (dh @ a).mul_(mask)


def plain_backward(x: torch.Tensor, a: torch.Tensor, dh: torch.Tensor) -> tuple:
    return dh.t() @ x, dh @ a


def kernels_backward(x: torch.Tensor, a: torch.Tensor, dh: torch.Tensor) -> tuple:
    from trainer import lora_kernels as k

    return k.masked_dha(dh, x, SEED, 0.0), k.masked_dx(dh, a, SEED, 0.0)


def main() -> None:
    from trainer import lora_kernels as k

    for rows, cols in ((8192, 4096), (8192, 14336)):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(RANK, cols, device="cuda", dtype=torch.bfloat16)
        dh = torch.randn(rows, RANK, device="cuda", dtype=torch.bfloat16)
        shape = f"[{rows}x{cols}]"
        print(f"{shape} torch: fwd {timed(functools.partial(torch_forward, x, a)):.3f} ms, "
              f"bwd {timed(functools.partial(torch_backward, x, a, dh)):.3f} ms; "
              f"GEMM without dropout {timed(functools.partial(torch.matmul, x, a.t())):.3f} ms", flush=True)
        for bm, bk, warps in ((64, 64, 4), (128, 64, 4), (128, 128, 8)):
            xa = timed(functools.partial(k.masked_xa, x, a, SEED, P, bm=bm, bk=bk, warps=warps))
            dha = timed(functools.partial(k.masked_dha, dh, x, SEED, P, bm=bm, bk=bk, warps=warps))
            dx = timed(functools.partial(k.masked_dx, dh, a, SEED, P, bm=bm, bk=bk, warps=warps))
            print(f"{shape} triton bm={bm} bk={bk} warps={warps}: fwd {xa:.3f} ms, bwd {dha + dx:.3f} ms "
                  f"(dA {dha:.3f} + dx {dx:.3f})", flush=True)
        # Without dropout (qforge's default, peft.dropout=0) the branch takes cuBLAS, not the kernels: both timed.
        plain_bwd = timed(functools.partial(plain_backward, x, a, dh))
        triton_bwd = timed(functools.partial(kernels_backward, x, a, dh))
        print(f"{shape} without dropout: triton fwd {timed(functools.partial(k.masked_xa, x, a, SEED, 0.0)):.3f} ms, "
              f"bwd {triton_bwd:.3f} ms; cuBLAS bwd {plain_bwd:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
