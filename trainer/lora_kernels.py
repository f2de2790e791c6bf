"""Triton kernels for the LoRA branch on CUDA: dropout drawn inside the rank-r GEMMs, never materialised.

The three products of a LoRA layer with dropout all touch the full-width input once:
  forward   h  = (x * keep) @ A^T            [N, r]
  backward  dA = dh^T @ (x * keep)           [r, K]
            dx = (dh @ A) * keep             [N, K]
`keep` is a Bernoulli(1-p) draw made from (seed, element index) with Philox inside each kernel, so the
mask costs no memory and no extra pass: every kernel draws the same mask for the same seed. The 1/(1-p)
scale is applied by the caller on the rank-r side. Inputs are 2-D, row-major; r is padded to a power
of two >= 16 (tl.dot's smallest tile) by the caller.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_K = 64
# Philox offsets are 32-bit: one call handles at most this many input elements.
MAX_ELEMENTS = 2**31 - 1


@triton.jit
def _keep(seed, rows, col_start, n_cols, threshold, BK: tl.constexpr):
    """Keep-mask of a [rows, col_start:col_start+BK] tile: element kept when its 16-bit draw >= threshold.

    One Philox-4x32 call (7 rounds, which passes BigCrush) gives 8 adjacent columns 16 bits each, so
    the mask costs 1/8 of a Philox call per element: drawing it, not reading x, was the bottleneck.
    """
    octs = col_start // 8 + tl.arange(0, BK // 8)
    counter = rows[:, None] * ((n_cols + 7) // 8) + octs[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter, n_rounds=7)
    lo0, hi0 = (r0 & 0xFFFF).to(tl.int32), (r0 >> 16).to(tl.int32)
    lo1, hi1 = (r1 & 0xFFFF).to(tl.int32), (r1 >> 16).to(tl.int32)
    lo2, hi2 = (r2 & 0xFFFF).to(tl.int32), (r2 >> 16).to(tl.int32)
    lo3, hi3 = (r3 & 0xFFFF).to(tl.int32), (r3 >> 16).to(tl.int32)
    evens = tl.interleave(tl.interleave(lo0, lo2), tl.interleave(hi0, hi2))
    odds = tl.interleave(tl.interleave(lo1, lo3), tl.interleave(hi1, hi3))
    return tl.interleave(evens, odds) >= threshold


@triton.jit
def _xa_kernel(x_ptr, a_ptr, out_ptr, n_rows, n_cols, seed, threshold, cols_per_split, R: tl.constexpr,
               DROP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    first = split * cols_per_split
    for start in range(first, tl.minimum(first + cols_per_split, n_cols), BK):
        cols = start + tl.arange(0, BK)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0)
        if DROP:
            x = tl.where(_keep(seed, rows, start, n_cols, threshold, BK), x, tl.zeros_like(x))
        a = tl.load(a_ptr + ranks[None, :] * n_cols + cols[:, None], mask=cols[:, None] < n_cols, other=0.0)
        acc = tl.dot(x, a, acc)
    tl.store(out_ptr + split * n_rows * R + rows[:, None] * R + ranks[None, :], acc, mask=rows[:, None] < n_rows)


@triton.jit
def _dha_kernel(dh_ptr, x_ptr, out_ptr, n_rows, n_cols, seed, threshold, splits, R: tl.constexpr,
                DROP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    start_col = tl.program_id(0) * BK
    cols = start_col + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    for start in range(split * BM, n_rows, BM * splits):
        rows = start + tl.arange(0, BM)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0)
        if DROP:
            x = tl.where(_keep(seed, rows, start_col, n_cols, threshold, BK), x, tl.zeros_like(x))
        dh = tl.load(dh_ptr + rows[:, None] * R + ranks[None, :], mask=rows[:, None] < n_rows, other=0.0)
        acc = tl.dot(tl.trans(dh), x, acc)
    tl.store(out_ptr + split * R * n_cols + ranks[:, None] * n_cols + cols[None, :], acc, mask=cols[None, :] < n_cols)


@triton.jit
def _dx_kernel(dh_ptr, a_ptr, dx_ptr, n_rows, n_cols, seed, threshold, R: tl.constexpr, DROP: tl.constexpr,
               BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    start_col = tl.program_id(1) * BK
    cols = start_col + tl.arange(0, BK)
    ranks = tl.arange(0, R)
    dh = tl.load(dh_ptr + rows[:, None] * R + ranks[None, :], mask=rows[:, None] < n_rows, other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * n_cols + cols[None, :], mask=cols[None, :] < n_cols, other=0.0)
    dx = tl.dot(dh, a)
    if DROP:
        dx = tl.where(_keep(seed, rows, start_col, n_cols, threshold, BK), dx, tl.zeros_like(dx))
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)


def drop_threshold(p: float) -> int:
    """The 16-bit threshold for dropout probability p: an element is dropped when its draw is below it."""
    return int(round(p * 65536))


def effective_p(p: float) -> float:
    """The dropout probability the kernels actually apply (p to 1/65536), for an exact 1/(1-p) rescale."""
    return drop_threshold(p) / 65536


def padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_contiguous() or x.numel() > MAX_ELEMENTS:
        raise ValueError("lora_kernels expects a contiguous 2-D input under 2**31 elements")


def _sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tiles(product: str, n_cols: int) -> Tuple[int, int, int]:
    """(rows, columns, warps) per program, measured on an H200 with bench/lora_kernels_bench.py at the
    Llama-3-8B widths: the 4096-wide inputs (attention, gate/up) like bigger tiles, 14336 (down) smaller."""
    if n_cols > 8192:
        return BLOCK_M, BLOCK_K, 4
    return (128, 128, 8) if product == "xa" else (128, 64, 4)


def masked_xa(x: torch.Tensor, a: torch.Tensor, seed: int, p: float, bm: int = 0, bk: int = 0,
              warps: int = 0, waves: int = 4) -> torch.Tensor:
    """(x * keep) @ a^T for x [N, K] and a [R, K] (R padded); returns [N, R] in fp32."""
    threshold = drop_threshold(p)
    _check(x)
    n_rows, n_cols = x.shape
    bm, bk, warps = (bm, bk, warps) if bm else _tiles("xa", n_cols)
    row_blocks, col_blocks = triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bk)
    # Split the column reduction until the GPU has `waves` programs per SM (partial sums, then one add).
    splits = max(1, min(col_blocks, triton.cdiv(waves * _sms(x.device), row_blocks)))
    cols_per_split = triton.cdiv(col_blocks, splits) * bk
    splits = triton.cdiv(n_cols, cols_per_split)
    partial = torch.empty((splits, n_rows, a.shape[0]), dtype=torch.float32, device=x.device)
    _xa_kernel[(row_blocks, splits)](x, a, partial, n_rows, n_cols, seed, threshold, cols_per_split, R=a.shape[0],
                                     DROP=threshold > 0, BM=bm, BK=bk, num_warps=warps)
    return partial.sum(0) if splits > 1 else partial[0]


def masked_dha(dh: torch.Tensor, x: torch.Tensor, seed: int, p: float, bm: int = 0, bk: int = 0,
               warps: int = 0, waves: int = 4) -> torch.Tensor:
    """dh^T @ (x * keep) for dh [N, R] and x [N, K]; returns [R, K] in fp32."""
    threshold = drop_threshold(p)
    _check(x)
    n_rows, n_cols = x.shape
    bm, bk, warps = (bm, bk, warps) if bm else _tiles("dha", n_cols)
    col_blocks = triton.cdiv(n_cols, bk)
    splits = max(1, min(triton.cdiv(waves * _sms(x.device), col_blocks), triton.cdiv(n_rows, bm)))
    partial = torch.empty((splits, dh.shape[1], n_cols), dtype=torch.float32, device=x.device)
    _dha_kernel[(col_blocks, splits)](dh, x, partial, n_rows, n_cols, seed, threshold, splits, R=dh.shape[1],
                                      DROP=threshold > 0, BM=bm, BK=bk, num_warps=warps)
    return partial.sum(0) if splits > 1 else partial[0]


def masked_dx(dh: torch.Tensor, a: torch.Tensor, seed: int, p: float, dtype: Optional[torch.dtype] = None,
              bm: int = 0, bk: int = 0, warps: int = 0) -> torch.Tensor:
    """(dh @ a) * keep for dh [N, R] and a [R, K]; returns [N, K]."""
    threshold = drop_threshold(p)
    n_rows, n_cols = dh.shape[0], a.shape[1]
    bm, bk, warps = (bm, bk, warps) if bm else _tiles("dx", n_cols)
    if n_rows * n_cols > MAX_ELEMENTS:
        raise ValueError("lora_kernels expects under 2**31 elements")
    dx = torch.empty((n_rows, n_cols), dtype=dtype or dh.dtype, device=dh.device)
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bk))
    _dx_kernel[grid](dh, a, dx, n_rows, n_cols, seed, threshold, R=a.shape[0], DROP=threshold > 0, BM=bm, BK=bk,
                     num_warps=warps)
    return dx


@triton.jit
def _keep_mask_kernel(out_ptr, n_rows, n_cols, seed, threshold, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    start_col = tl.program_id(1) * BK
    cols = start_col + tl.arange(0, BK)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    keep = _keep(seed, rows, start_col, n_cols, threshold, BK)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(out_ptr.dtype.element_ty), mask=inside)


def keep_mask(n_rows: int, n_cols: int, seed: int, p: float, device: torch.device) -> torch.Tensor:
    """The mask the kernels above draw for (seed, p), as 0/1 floats: for tests and inspection."""
    threshold = drop_threshold(p)
    out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device)
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_K))
    _keep_mask_kernel[grid](out, n_rows, n_cols, seed, threshold, BM=BLOCK_M, BK=BLOCK_K)
    return out
