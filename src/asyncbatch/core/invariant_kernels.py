"""Triton kernels whose result for a row depends on that row alone: a matrix product and RMSNorm.

Imports triton at import time: import this module lazily (`asyncbatch.core.invariant` does).

Why cuBLAS and torch's reductions are not enough: they pick an algorithm from the problem's shape, so the same row
is reduced in a different order (split-K or not, another tile, another instruction) when the batch around it has
another size, and in bfloat16 the rounding differs. Here the order of every reduction is fixed by the kernel's
configuration, and the configuration is a function of (N, K) or the row length only, never of the row count M:

* `_matmul`: one program per [BLOCK_M, BLOCK_N] output tile; it walks K in BLOCK_K chunks, in order, accumulating
  in float32 through the tensor-core instruction that the (fixed) tile shape selects. With SPLIT_K > 1 each split
  walks its own K range and a second kernel adds the float32 partials in split order. Rows beyond M load zeros
  and are never stored, so a row's bits do not depend on which tile it lands in or what shares it.
* `_rms_norm`: one program per row, the whole row in registers, one `tl.sum`.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import triton
import triton.language as tl


@triton.jit
def _matmul(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, k_per_split, sxm, sxk, swn, swk, som, son, sos,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
            PARTIAL: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs sharing a weight tile run together, so L2 serves the rest
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < k_hi
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * swn + kk[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    ptrs = out_ptr + rm[:, None] * som + rn[None, :] * son
    mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(ptrs + split * sos, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits(part_ptr, b_ptr, out_ptr, MN, N, sps, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.load(part_ptr + i, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):  # in split order, always
        acc += tl.load(part_ptr + s * sps + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, sx, so, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / N
    y = (x * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)  # as transformers: normalise in float32,
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)                    # round to the input dtype, then scale
    tl.store(out_ptr + row * so + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


@attrs.frozen
class MatmulConfig:
    """Tile shape and launch options of `_matmul`. `split_k` > 1 adds a second, ordered reduction kernel."""

    block_m: int = 64
    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


#: Batch-invariant mode's tiles, by row count. A row's bits depend only on BLOCK_K (the order of the K chunks) and
#: on there being no split-K: on an H100 every tile from 16x32 to 128x128, 4 or 8 warps, 3 or 4 stages, gave the
#: same bits for M = 32, 256 and 2048 (`benchmarks/gemm_small_m.py`; asserted by tests/gpu). So the tile may follow
#: M, for speed, while BLOCK_K = 128 stays fixed. Small M: BLOCK_N 32 gives the skinny decode GEMMs (N = 4096)
#: about one program per SM; large M: 128x128 tiles reuse each weight tile across rows (prefill chunks).
INVARIANT_TILES: tuple[tuple[int, MatmulConfig], ...] = (
    (64, MatmulConfig(64, 32, 128, 1, 4, 4)),
    (512, MatmulConfig(64, 128, 128, 1, 4, 3)),
    (1 << 62, MatmulConfig(128, 128, 128, 1, 8, 3)),
)
INVARIANT = INVARIANT_TILES[0][1]


def invariant_config(m: int) -> MatmulConfig:
    """The batch-invariant tile for `m` rows (every one has BLOCK_K 128 and no split-K)."""
    return next(cfg for limit, cfg in INVARIANT_TILES if m <= limit)


def matmul(x: Any, weight: Any, bias: Any = None, config: MatmulConfig = MatmulConfig()) -> Any:
    """`x @ weight.T + bias` for `x` [..., K] and a `torch.nn.Linear` weight [N, K]; output in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out.view(*lead, n)
    c = config
    split = max(1, min(c.split_k, triton.cdiv(k, c.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), c.block_k) * c.block_k
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n), split)
    has_bias = bias is not None
    if split == 1:
        _matmul[grid](x2, weight, bias if has_bias else out, out, m, n, k, k_per_split, x2.stride(0), x2.stride(1),
                      weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), 0, BLOCK_M=c.block_m,
                      BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=has_bias, PARTIAL=False,
                      num_warps=c.num_warps, num_stages=c.num_stages)
        return out.view(*lead, n)
    part = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    _matmul[grid](x2, weight, part, part, m, n, k, k_per_split, x2.stride(0), x2.stride(1), weight.stride(0),
                  weight.stride(1), part.stride(1), part.stride(2), part.stride(0), BLOCK_M=c.block_m,
                  BLOCK_N=c.block_n, BLOCK_K=c.block_k, HAS_BIAS=False, PARTIAL=True, num_warps=c.num_warps,
                  num_stages=c.num_stages)
    block = 1024
    _sum_splits[(triton.cdiv(m * n, block),)](part, bias if has_bias else part, out, m * n, n, part.stride(0),
                                              SPLITS=split, HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
    return out.view(*lead, n)


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """transformers' RMSNorm (Llama, Mistral, Qwen2/3 form) over the last dimension, one program per row."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=torch.result_type(weight, x))
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), n, eps, BLOCK=block,
                                  num_warps=max(1, min(16, block // 256)))
    return out.view(*x.shape[:-1], n)
