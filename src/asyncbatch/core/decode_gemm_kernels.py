"""The Triton matrix product of decode steps: few rows (at most `MAX_ROWS`), a whole weight streamed once.

Imports triton at import time: import this module lazily (`asyncbatch.core.decode_gemm` does).

A decode step's GEMMs have as many rows as sequences and read every weight byte once, so they are bound by
memory bandwidth, and at 10-90 us a call the ramp-up and tail of each launch are a large share of it. One program
owns BLOCK_N output columns for all rows and walks K in order; the tile follows a rule on (N, rows), fixed ahead
of time, never autotuned per call.

With `pdl` (Hopper and newer) the kernel is launched as a programmatic dependent launch: its programs may start
while the previous kernel of the stream is finishing, wait (`gdc_wait`) until that kernel's writes are visible,
then at once allow the next kernel to launch (`gdc_launch_dependents`). Launch latency and block scheduling then
overlap the neighbouring kernels' tails. Every program waits before it touches memory and before it can exit, so
each kernel completes only after its predecessor did, and the stream's order holds transitively.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MAX_ROWS = 64  # beyond this the product reuses each weight tile across row tiles, and cuBLAS does that better


@triton.jit
def _decode_matmul(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, sxm, sxk, swn, swk, som, son,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * swn + rk[None, :] * swk
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # row masks only: the loads stay 16-byte vectors
            x = tl.load(x_ptrs + k0 * sxk, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + k0 * swk, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptrs + k0 * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 * swk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@attrs.frozen
class Tile:
    """Columns per program, K chunk, and launch options of `_decode_matmul`."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of pipelined tiles per program: fits an A100's and a Hopper's SMs


def tile(rows: int, n: int, element_size: int = 2, *, k: int | None = None) -> Tile:
    """The tile for `rows` x `n` outputs of `element_size`-byte elements.

    Chosen in the default engine (8B Llama, bf16, 32 sequences, CUDA graphs, an H100), where it beat the tiles that
    won in isolation: narrow products (N <= 4K: o, down) take 16 columns and 256-wide K chunks, two programs per
    SM; q/k/v (N up to 12K) 16 columns and 128-wide chunks; wide ones (gate/up) 64 columns over several waves.
    Fewer stages (then narrower K chunks) keep the pipelined tiles within `SHARED_MEMORY_BUDGET` for more rows
    or wider elements."""
    if n >= 12288:
        block_n, block_k, stages = 64, 256, 3
    elif n > 4096:
        block_n, block_k, stages = 16, 128, 4
    else:
        block_n, block_k, stages = 16, 256, 4
    return fit(Tile(block_n, block_k, 4, stages), rows, element_size)


def fit(t: Tile, rows: int, element_size: int = 2) -> Tile:
    """`t` with fewer stages, then narrower K chunks, until its pipelined tiles for `rows` rows of
    `element_size`-byte elements fit `SHARED_MEMORY_BUDGET`."""
    block_m = max(16, triton.next_power_of_2(rows))
    stages, block_k = t.num_stages, t.block_k

    def smem() -> int:
        return stages * (block_m + t.block_n) * block_k * element_size

    while smem() > SHARED_MEMORY_BUDGET and stages > 2:
        stages -= 1
    while smem() > SHARED_MEMORY_BUDGET and block_k > 32:
        block_k //= 2
    return Tile(t.block_n, block_k, t.num_warps, stages)


def matmul(x: Any, weight: Any, bias: Any = None, *, pdl: bool = False, tile_: Tile | None = None) -> Any:
    """`x @ weight.T + bias` for `x` [..., K] with at most `MAX_ROWS` rows and a `torch.nn.Linear` weight [N, K];
    output in x's dtype. `pdl`: launch as a programmatic dependent launch (compute capability >= 9.0 only).
    `tile_`: another tile than `tile`'s (benchmarks)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"decode_gemm_kernels.matmul takes at most {MAX_ROWS} rows, got {m}")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out.view(*lead, n)
    t = tile_ or tile(m, n, x.element_size(), k=k)
    has_bias = bias is not None
    extra = {"launch_pdl": True} if pdl else {}
    _decode_matmul[(triton.cdiv(n, t.block_n),)](
        x2, weight, bias if has_bias else out, out, m, n, k, x2.stride(0), x2.stride(1), weight.stride(0),
        weight.stride(1), out.stride(0), out.stride(1), BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, EVEN_K=k % t.block_k == 0, HAS_BIAS=has_bias, PDL=pdl,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 as torch's default (no TF32)
        num_warps=t.num_warps, num_stages=t.num_stages, **extra)
    return out.view(*lead, n)
