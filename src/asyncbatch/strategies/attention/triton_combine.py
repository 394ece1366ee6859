"""The split-combining kernels of the `triton` attention backend (flash-decoding's reduction of per-split partial
outputs through their log-sum-exp). Imports triton at import time: `triton_kernels` imports it, lazily.

* `_combine_rows`: the combine itself, called by the last split of a (sequence, kv head) to finish, inside
  `triton_kernels._paged_attn` (the fused combine).
* `_combine_splits`: the same reduction as a kernel of its own, for steps with more splits than one program should
  combine serially (`triton_kernels.FUSED_COMBINE_MAX_SPLITS`); it also writes zeros for padding tokens.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _combine_rows(part_ptrs, sp_s, lse_ptrs, out_ptrs, mask, row_ok, active, BLOCK_M: tl.constexpr,
                  D_P: tl.constexpr, SPLITS: tl.constexpr):
    """Rows of the first `active` partial outputs (split stride `sp_s`) weighted by their log-sum-exp, into
    `out_ptrs`. The loops are unrolled (SPLITS is small, see `FUSED_COMBINE_MAX_SPLITS`), so the loads of all
    splits are in flight together."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for i in tl.static_range(SPLITS):
        on = row_ok & (tl.full([BLOCK_M], i, tl.int32) < active)
        m = tl.maximum(m, tl.load(lse_ptrs + i, mask=on, other=float("-inf"), cache_modifier=".cg"))
    m = tl.where(row_ok, m, 0.0)  # a real token sees its own position, so its maximum is finite
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for i in tl.static_range(SPLITS):
        on = row_ok & (tl.full([BLOCK_M], i, tl.int32) < active)
        w = tl.math.exp2(tl.load(lse_ptrs + i, mask=on, other=float("-inf"), cache_modifier=".cg") - m)
        den += w
        acc += w[:, None] * tl.load(part_ptrs + i * sp_s, mask=mask & on[:, None], other=0.0,
                                    cache_modifier=".cg")
    tl.store(out_ptrs, (acc / tl.where(row_ok, den, 1.0)[:, None]).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _combine_splits(part_ptr, lse_ptr, out_ptr, seq_ptr, sp_t, sp_h, sp_s, sl_t, sl_h, so_t, so_h,
                    SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                    PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0)
    hq = tl.program_id(1)
    d = tl.arange(0, D_P)
    out_ptrs = out_ptr + t * so_t + hq * so_h + d
    if tl.load(seq_ptr + t) < 0:
        tl.store(out_ptrs, tl.zeros([D_P], tl.float32).to(out_ptr.dtype.element_ty), mask=d < D)
        return
    sp = tl.arange(0, SPLITS_P)
    lse = tl.load(lse_ptr + t * sl_t + hq * sl_h + sp, mask=sp < SPLITS, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))  # a real token sees its own position, so the max is finite
    parts = tl.load(part_ptr + t * sp_t + hq * sp_h + sp[:, None] * sp_s + d[None, :],
                    mask=(sp < SPLITS)[:, None] & (d < D)[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=d < D)
