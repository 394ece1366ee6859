"""Row-level kernels and helpers of the `triton` attention backend. Imports triton at import time: `triton_kernels`
imports it, lazily.

* `_rope`: the rotary position embedding of rows already loaded, as transformers' `apply_rotary_pos_emb` computes
  it (`x * cos + rotate_half(x) * sin`), in float32 and rounded once, as its compiled form rounds. The kernels call
  it where they load q and the step's new K (`engine.fuse_rotary`), so a decode step runs no rotary kernels.
* `_own_token`: a decode token's own K/V row, written into its cache slot and folded into the online softmax from
  registers (the fused cache write).
* `_cache_write` (`write_cache`): the step's new K and V into their cache slots, one program per token; with
  `ROTARY`, K rotated on its way in.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rope(x, x_ptrs, cos_ptrs, sin_ptrs, d, mask, D: tl.constexpr):
    """`x` (loaded from `x_ptrs`, whose last index is `d`) rotated by the cos and sin rows at `cos_ptrs`,
    `sin_ptrs` (same shape). The partner of element d is d + D/2 in the first half (negated) and d - D/2 in the
    second, which is a second load of the same, cached, row."""
    half: tl.constexpr = D // 2
    partner = tl.load(x_ptrs + tl.where(d < half, half, -half), mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptrs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptrs, mask=mask, other=0.0).to(tl.float32)
    rotated = x.to(tl.float32) * c + tl.where(d < half, -partner, partner) * s
    return rotated.to(x.dtype)


@triton.jit
def _own_token(q, k, v, kc_ptr, vc_ptr, slot, skc_b, skc_s, svc_b, svc_s, d, dm, row_ok, m_i, l_i, acc, scale_log2,
               BS: tl.constexpr):
    """A decode token's own K/V row of one kv head (`k`, `v`, [D_P]): stored into its cache `slot`, and folded into
    the rows' online softmax straight from registers, rounded to the cache's dtype as a read of the cache would give
    it. Returns the updated (m_i, l_i, acc)."""
    k = k.to(kc_ptr.dtype.element_ty)
    v = v.to(vc_ptr.dtype.element_ty)
    tl.store(kc_ptr + (slot // BS) * skc_b + (slot % BS) * skc_s + d, k, mask=dm)
    tl.store(vc_ptr + (slot // BS) * svc_b + (slot % BS) * svc_s + d, v, mask=dm)
    score = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * scale_log2
    score = tl.where(row_ok, score, float("-inf"))
    m_new = tl.maximum(m_i, score)
    alpha = tl.math.exp2(m_i - m_new)
    prob = tl.math.exp2(score - m_new)
    l_i = l_i * alpha + prob
    # rounded as the chunks' probabilities and values enter their dot
    acc = acc * alpha[:, None] + prob.to(q.dtype).to(tl.float32)[:, None] * v.to(q.dtype).to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def _cache_write(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                 sk_t, sk_h, sv_t, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, cos_ptr, sin_ptr, scs,
                 HKV: tl.constexpr, HKV_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BS: tl.constexpr,
                 ROTARY: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # before any access, and in every program: see `attention`'s `pdl`
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BS
    off = slot % BS
    h = tl.arange(0, HKV_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    m = (h < HKV) & (d < D)
    k = tl.load(k_ptr + t * sk_t + h * sk_h + d, mask=m)
    if ROTARY:  # D_P == D here (`rotary_fits`)
        k = _rope(k, k_ptr + t * sk_t + h * sk_h + d, cos_ptr + t * scs + h * 0 + d, sin_ptr + t * scs + h * 0 + d,
                  d, m, D)
    tl.store(kc_ptr + blk * skc_b + off * skc_s + h * skc_h + d, k.to(kc_ptr.dtype.element_ty), mask=m)
    v = tl.load(v_ptr + t * sv_t + h * sv_h + d, mask=m)
    tl.store(vc_ptr + blk * svc_b + off * svc_s + h * svc_h + d, v.to(vc_ptr.dtype.element_ty), mask=m)


def rotary_fits(head_dim: int, rotary: tuple[Any, Any]) -> bool:
    """Whether the kernels can apply `rotary` (cos, sin [T, D]) themselves: a full-width rotary embedding over a
    power-of-two head (the partner of each element is then half a row away, inside the loaded row)."""
    cos, sin = rotary
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and cos.shape[-1] == head_dim == sin.shape[-1]
            and cos.stride() == sin.stride() and cos.stride(-1) == 1)


def rotary_args(rotary: tuple[Any, Any] | None, fallback: Any) -> tuple[Any, Any, int]:
    return (rotary[0], rotary[1], rotary[0].stride(0)) if rotary is not None else (fallback, fallback, 0)


def write_cache(k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, *, pdl: bool = False,
                rotary: tuple[Any, Any] | None = None) -> None:
    """k, v [T, Hkv, D] (any strides with a unit last one) -> caches [num_blocks, block_size, Hkv, D]. `rotary`:
    (cos, sin) [T, D] that `rotary_fits`, applied to k on its way into the cache."""
    num_tokens, kv_heads, head_dim = k.shape
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _cache_write[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), *rotary_args(rotary, k), HKV=kv_heads, HKV_P=triton.next_power_of_2(kv_heads), D=head_dim,
        D_P=triton.next_power_of_2(head_dim), BS=k_cache.shape[1], ROTARY=rotary is not None, PDL=pdl,
        num_warps=4 if kv_heads * head_dim >= 1024 else 1, **({"launch_pdl": True} if pdl else {}))
