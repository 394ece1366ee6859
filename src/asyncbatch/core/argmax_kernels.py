"""A row-wise argmax in two Triton kernels, for the sampler. Imports triton at import time: import it lazily
(`asyncbatch.core.sampling` does, for CUDA tensors only).

Why not `torch.argmax`: over a [32, 128256] bfloat16 logits tensor it runs one reduction per row, so 32 programs
walk 256 KB each while the rest of the GPU idles (40-44 us a decode step on an H100, profiled, for 8 MB that the
card reads in under 3 us). Here each row is cut into fixed chunks:

* `_chunk_max`: one program per (row, chunk) keeps the chunk's largest value and the first position holding it.
* `_pick`: one program per row takes the largest of its chunk maxima, the first chunk on ties.

The result is `torch.argmax`'s, exactly: a maximum is exact, and ties go to the lowest index in both stages. NaN
counts as larger than every number (the first NaN wins), as in torch. Chunking depends on the row length alone,
never on the row count, so a row's result does not depend on what shares its batch.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

CHUNK = 2048
NO_NAN = 2**31 - 1


@triton.jit
def _chunk_max(x_ptr, val_ptr, idx_ptr, nan_ptr, n, sx, CHUNKS, CHUNK: tl.constexpr, NO_NAN: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    pos = c * CHUNK + tl.arange(0, CHUNK)
    ok = pos < n
    x = tl.load(x_ptr + row.to(tl.int64) * sx + pos, mask=ok, other=float("-inf")).to(tl.float32)
    nan = ok & (x != x)
    first_nan = tl.min(tl.where(nan, pos, NO_NAN), 0)
    x = tl.where(nan, float("-inf"), x)
    best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    out = row * CHUNKS + c
    tl.store(val_ptr + out, best)
    tl.store(idx_ptr + out, c * CHUNK + at)
    tl.store(nan_ptr + out, first_nan)


@triton.jit
def _pick(val_ptr, idx_ptr, nan_ptr, out_ptr, CHUNKS, CHUNKS_P: tl.constexpr, NO_NAN: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_P)
    ok = c < CHUNKS
    vals = tl.load(val_ptr + row * CHUNKS + c, mask=ok, other=float("-inf"))
    idxs = tl.load(idx_ptr + row * CHUNKS + c, mask=ok, other=NO_NAN)
    first_nan = tl.min(tl.load(nan_ptr + row * CHUNKS + c, mask=ok, other=NO_NAN), 0)
    # Chunk maxima are ordered by position, so the first chunk holding the maximum holds its first position.
    _, best = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
    at = tl.sum(tl.where(c == best, idxs, 0), 0)
    tl.store(out_ptr + row, tl.where(first_nan < NO_NAN, first_nan, at))


def row_argmax(x: Any) -> Any:
    """int32 [rows]: the index of each row's maximum of `x` [rows, n] (n < 2**31 - 1), as `torch.argmax`."""
    rows, n = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    chunks = triton.cdiv(n, CHUNK)
    vals = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
    idxs = torch.empty(rows, chunks, device=x.device, dtype=torch.int32)
    nans = torch.empty(rows, chunks, device=x.device, dtype=torch.int32)
    out = torch.empty(rows, device=x.device, dtype=torch.int32)
    if rows == 0:
        return out
    _chunk_max[(rows, chunks)](x, vals, idxs, nans, n, x.stride(0), chunks, CHUNK=CHUNK, NO_NAN=NO_NAN,
                               num_warps=4)
    _pick[(rows,)](vals, idxs, nans, out, chunks, CHUNKS_P=triton.next_power_of_2(chunks), NO_NAN=NO_NAN,
                   num_warps=1)
    return out
