"""Triton kernels of the `triton` attention backend. Imports triton at import time: import this module lazily.

Three kernels, all launched on grids that depend only on tensor shapes and the step's Python scalars (so a step
can be captured in a CUDA graph); work beyond a sequence's real length exits inside the kernel:

* `_cache_write` (in `triton_rows`): the step's new K and V into their cache slots, one program per token. Decode
  steps whose context is split skip it: the split holding a sequence's new position writes that K/V itself
  (`WRITE_KV`).
* `_paged_attn`: one program per (sequence, tile of query tokens, kv head, kv split). Its rows are the query
  heads of a GQA group times the tile's tokens, so K and V are read once per group and `tl.dot` gets >= 16 rows.
  The context is read in chunks of BLOCK_N positions gathered through the block table, with an online softmax.
  In steps holding prefill chunks the grid is `padded tokens // BLOCK_Q + padded sequences` tiles, an upper bound
  on the tiles any mix needs: sequence s owns tiles from `query_start[s] // BLOCK_Q + s`, and each program finds
  its sequence by binary search over those starts. The launch then depends on the padded counts alone, so one
  captured graph serves every mix of prefill chunks and decodes with the same padded token count.
  With `ROTARY` it rotates q (and the new K it writes) as it loads them (`engine.fuse_rotary`).
* `_combine_splits` (in `triton_combine`, with `_combine_rows`): flash-decoding's reduction of the per-split
  partial outputs via their log-sum-exp; it also writes zeros for padding tokens. By default a decode step needs no such second kernel: each split counts its
  finish on a per-(sequence, kv head) counter, and the last to finish reduces the partials (`_combine_rows`) and
  puts the counter back to zero. That saves a launch per layer (32 a step on an 8B Llama). With many splits (small
  batches) the one program's serial reduction costs more than the launch, so those keep the second kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .triton_combine import _combine_rows, _combine_splits
from .triton_rows import _own_token, _rope, rotary_args, rotary_fits, write_cache  # noqa: F401


@triton.jit
def _paged_attn(q_ptr, kc_ptr, vc_ptr, out_ptr, lse_ptr, bt_ptr, qs_ptr, pos_ptr, len_ptr,
                sq_t, sq_h, so_t, so_h, so_s, sl_t, sl_h,
                skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, sbt,
                scale_log2, window, num_seqs,
                fin_ptr, cnt_ptr, seq_ptr, sf_t, sf_h, num_tokens,
                kn_ptr, vn_ptr, slot_ptr, skn_t, skn_h, svn_t, svn_h, cos_ptr, sin_ptr, scs,
                G: tl.constexpr, G_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, EVEN_D: tl.constexpr, BS: tl.constexpr,
                SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr,
                VARLEN: tl.constexpr, FUSE_COMBINE: tl.constexpr, WRITE_KV: tl.constexpr, ROTARY: tl.constexpr,
                PDL: tl.constexpr):
    # BLOCK_M = BLOCK_Q * G_P rows: row r is query token r // G_P of the tile, head r % G_P of the group
    if PDL:  # the dependents are let in after the main loop: early, their programs would take the SM slots that
        gdc_wait()  # this grid's later waves need
    pid = tl.program_id(0)
    if FUSE_COMBINE:  # decode only (one token per sequence); the grid covers max(tokens, sequences)
        if tl.program_id(2) == 0 and pid < num_tokens:
            if tl.load(seq_ptr + pid) < 0:  # a padding token: its rows of the output are zeros
                zr = tl.arange(0, G_P)
                zd = tl.arange(0, D_P)
                tl.store(fin_ptr + pid * sf_t + (tl.program_id(1) * G + zr)[:, None] * sf_h + zd[None, :],
                         tl.zeros([G_P, D_P], tl.float32).to(fin_ptr.dtype.element_ty),
                         mask=(zr < G)[:, None] & (zd < D)[None, :])
        if pid >= num_seqs:
            return
    h = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_M)
    g = r % G_P
    if VARLEN:
        # The last sequence whose first tile index (query_start // BLOCK_Q + s) is <= pid owns this program.
        lo = 0
        hi = num_seqs
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if tl.load(qs_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid
            else:
                hi = mid
        s = lo
        qt = pid - (tl.load(qs_ptr + s) // BLOCK_Q + s)
        q_begin = tl.load(qs_ptr + s)
        q_len = tl.load(qs_ptr + s + 1) - q_begin
        if qt * BLOCK_Q >= q_len:  # padded sequence, or a tile past this sequence's query tokens
            return
        i = qt * BLOCK_Q + r // G_P
        row_ok = (i < q_len) & (g < G)
        tok = q_begin + i
        qpos = tl.load(pos_ptr + tok, mask=row_ok, other=0)
        hi = tl.max(tl.where(row_ok, qpos, -1)) + 1
    else:
        # Decode: one program per sequence, whose one token sits at position seq_len - 1. The context length and
        # the token's index load side by side, so the block table's first load waits for one load, not two.
        s = pid
        hi = tl.load(len_ptr + s)
        q_begin = tl.load(qs_ptr + s)
        if hi == 0:  # padded sequence
            return
        row_ok = g < G
        tok = q_begin + r * 0
        qpos = hi - 1 + r * 0
    head = h * G + g
    # Key range this tile can see ([lo, hi)); splits share it out in whole chunks.
    if USE_WINDOW:  # chunks start on multiples of BLOCK_N whatever the tile holds (masked extras change nothing)
        lo = tl.maximum(tl.min(tl.where(row_ok, qpos, hi)) - window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        lo = hi * 0
    per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), SPLITS) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)
    # WRITE_KV (decode): the token's own K/V are not in the cache yet; they come from the step's tensors below
    read_end = tl.minimum(end, hi - 1) if WRITE_KV else end

    d = tl.arange(0, D_P)
    dmask = d[None, :] < D
    q_ptrs = q_ptr + tok[:, None] * sq_t + head[:, None] * sq_h + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dmask, other=0.0)
    if ROTARY:  # q arrives as the product left it; D_P == D here (`rotary_fits`)
        q = _rope(q, q_ptrs, cos_ptr + tok[:, None] * scs + d[None, :], sin_ptr + tok[:, None] * scs + d[None, :],
                  d[None, :], row_ok[:, None] & dmask, D)

    if WRITE_KV:  # loaded before the loop, so that their latency hides behind it
        own = (hi - 1 >= start) & (hi - 1 < end)
        dmask_own = d < tl.where(own, D, 0)
        k_own = tl.load(kn_ptr + q_begin * skn_t + h * skn_h + d, mask=dmask_own, other=0.0)
        if ROTARY:
            k_own = _rope(k_own, kn_ptr + q_begin * skn_t + h * skn_h + d, cos_ptr + q_begin * scs + d,
                          sin_ptr + q_begin * scs + d, d, dmask_own, D)
        v_own = tl.load(vn_ptr + q_begin * svn_t + h * svn_h + d, mask=dmask_own, other=0.0)
        slot_own = tl.load(slot_ptr + q_begin).to(tl.int64)  # a real token: its slot is always there
    # Finite initial max: rows that see nothing in a chunk keep exp2(-inf - m) = 0 instead of NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    bt_row = bt_ptr + s * sbt
    for n0 in range(start, read_end, BLOCK_N):
        p = n0 + tl.arange(0, BLOCK_N)
        kv_ok = p < read_end
        blk = tl.load(bt_row + p // BS, mask=kv_ok, other=0).to(tl.int64)
        off = (p % BS)[:, None]
        k_ptrs = kc_ptr + blk[:, None] * skc_b + off * skc_s + h * skc_h + d[None, :]
        v_ptrs = vc_ptr + blk[:, None] * svc_b + off * svc_s + h * svc_h + d[None, :]
        if EVEN_D:  # a row-only mask keeps the 16-byte vector loads
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=kv_ok[:, None] & dmask, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2
        vis = kv_ok[None, :] & (p[None, :] <= qpos[:, None])
        if USE_WINDOW:
            vis = vis & (p[None, :] > qpos[:, None] - window)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        prob = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        if EVEN_D:
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=kv_ok[:, None] & dmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(prob.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    if WRITE_KV:
        if own:  # this split holds the new position: store the K/V, then one more softmax update
            m_i, l_i, acc = _own_token(q, k_own, v_own, kc_ptr + h * skc_h, vc_ptr + h * svc_h, slot_own, skc_b,
                                       skc_s, svc_b, svc_s, d, dmask_own, row_ok, m_i, l_i, acc, scale_log2, BS)
    if PDL:
        gdc_launch_dependents()
    empty = l_i == 0.0  # a split with no visible key (or a padded row)
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + tok[:, None] * so_t + head[:, None] * so_h + d[None, :]
    if PARTIAL:
        tl.store(o_ptrs + split * so_s, o, mask=row_ok[:, None] & dmask)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + tok * sl_t + head * sl_h + split, lse, mask=row_ok)
        if FUSE_COMBINE:
            # The last split of (sequence, kv head) to finish combines them all. The barrier orders every
            # thread's stores above before the one thread's release of the counter (a CUTLASS-style semaphore);
            # the winner's acquire, and loads that bypass L1, then see every other split's stores.
            tl.debug_barrier()
            counter = cnt_ptr + s * tl.num_programs(1) + h
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                tl.store(counter, 0)  # ready for the next launch (kernel boundaries order it)
                active = tl.cdiv(hi - lo, per_split)  # splits past the context hold nothing
                _combine_rows(out_ptr + tok[:, None] * so_t + head[:, None] * so_h + d[None, :], so_s,
                              lse_ptr + tok * sl_t + head * sl_h,
                              fin_ptr + tok[:, None] * sf_t + head[:, None] * sf_h + d[None, :],
                              row_ok[:, None] & dmask, row_ok, active, BLOCK_M, D_P, SPLITS)
    else:
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dmask)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def _launch(pdl: bool) -> dict[str, Any]:
    return {"launch_pdl": True} if pdl else {}


# Past this many splits the combining program's serial work outweighs a second kernel's launch (an H100 at batch 1,
# 64 splits: +0.18 ms a step with the fused combine; at batch 32, 3 splits: -0.04 ms).
FUSED_COMBINE_MAX_SPLITS = 8


def attention(q: Any, k_cache: Any, v_cache: Any, meta: Any, *, scale: float, sliding_window: int | None,
              splits: int, block_n: int, num_warps: int, num_stages: int, invariant: bool = False,
              counters: Callable[[int], Any] | None = None, pdl: bool = False,
              new_kv: tuple[Any, Any] | None = None, rotary: tuple[Any, Any] | None = None) -> Any:
    """Paged causal attention for every real token of the step (the cache already holds this step's K/V, unless
    `new_kv` is given).

    `splits` > 1 splits each sequence's context (decode steps only: one query token per sequence). With
    `counters` and at most `FUSED_COMBINE_MAX_SPLITS` splits, the last split of each sequence and kv head to finish
    combines the splits, else a second kernel does; `counters(n)` gives a zeroed int32 buffer of at least n
    counters that no other launch uses at the same time (each launch leaves it zeroed). `invariant`: every step,
    decode or mixed, runs the query-tiled kernel with one tile shape (16 rows) and no split, so a token's output
    is computed by the same code, over the same KV chunks in the same order, whatever its step. `pdl`: launch
    the kernels as programmatic dependent launches (compute capability >= 9.0); every program of every kernel
    waits for its predecessor first, so early returns and the zeroing of padding rows stay ordered. `new_kv`: the
    step's (k, v) [T, Hkv, D], in decode steps only (one token per sequence): the kernel writes them to their
    `meta.slot_mapping` slots itself (padding tokens write nothing) and reads them from registers, which saves
    the cache-write launch. `rotary`: (cos, sin) [T, D] that `rotary_fits`, applied to q (and to the new K of
    `new_kv`) where they are loaded: the cache holds rotated keys, as after transformers' own rotary."""
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    num_seqs = meta.block_table.shape[0]
    decode = meta.max_query == 1 and not invariant
    q = q if q.stride(-1) == 1 else q.contiguous()
    if invariant:
        g_p = _pow2(group)
        block_q = max(1, 16 // g_p)
        programs = num_tokens // block_q + num_seqs
        splits = 1
    elif decode:  # one token per tile: pad the GQA group to the 16 rows tl.dot needs
        g_p, block_q = max(16, _pow2(group)), 1
        programs = num_seqs
    else:  # enough tiles for any mix of query lengths with these padded counts (see the module docstring)
        g_p = _pow2(group)
        block_q = max(1, 64 // g_p)
        programs = num_tokens // block_q + num_seqs
        splits = 1
    partial = splits > 1
    fused = partial and counters is not None and splits <= FUSED_COMBINE_MAX_SPLITS
    if partial:
        out = torch.empty(num_tokens, q_heads, splits, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_tokens, q_heads, splits, device=q.device, dtype=torch.float32)
        so = (out.stride(0), out.stride(1), out.stride(2))
        sl = (lse.stride(0), lse.stride(1))
        final = torch.empty(num_tokens, q_heads, head_dim, device=q.device, dtype=q.dtype)
    else:  # rows of padding tokens are never stored, so start from zeros
        out = torch.zeros(num_tokens, q_heads, head_dim, device=q.device, dtype=q.dtype)
        lse = final = out
        so, sl = (out.stride(0), out.stride(1), 0), (0, 0)
    cnt = counters(num_seqs * kv_heads) if fused else meta.token_seq
    if fused:  # programs past the last sequence only zero the rows of padding tokens
        programs = max(programs, num_tokens)
    if new_kv is not None and not decode:
        raise ValueError("new_kv is for decode steps (one query token per sequence, not batch-invariant)")
    kn, vn = (t if t.stride(-1) == 1 else t.contiguous() for t in new_kv) if new_kv is not None else (q, q)
    bt = meta.block_table
    d_p = max(16, _pow2(head_dim))
    # block_n is tuned for 2-byte elements and head_dim <= 128: shrink the chunk for wider rows so that the K and
    # V chunks stay within shared memory
    row_bytes = d_p * k_cache.element_size()
    block_n = max(16, min(block_n, block_n * 256 // row_bytes))
    _paged_attn[(programs, kv_heads, splits)](
        q, k_cache, v_cache, out, lse, bt, meta.query_start, meta.positions, meta.seq_len,
        q.stride(0), q.stride(1), *so, *sl,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), bt.stride(0), scale * 1.4426950408889634, sliding_window or 0, num_seqs,
        final, cnt, meta.token_seq, final.stride(0), final.stride(1), num_tokens,
        kn, vn, meta.slot_mapping, kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), *rotary_args(rotary, q),
        G=group, G_P=g_p, BLOCK_Q=block_q, BLOCK_M=block_q * g_p, BLOCK_N=block_n, D=head_dim, D_P=d_p,
        EVEN_D=d_p == head_dim, BS=k_cache.shape[1], SPLITS=splits, USE_WINDOW=sliding_window is not None,
        PARTIAL=partial, VARLEN=not decode, FUSE_COMBINE=fused, WRITE_KV=new_kv is not None,
        ROTARY=rotary is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # the default; it only affects fp32
        PDL=pdl, num_warps=num_warps, num_stages=num_stages, **_launch(pdl))
    if not partial or fused:
        return final
    _combine_splits[(num_tokens, q_heads)](
        out, lse, final, meta.token_seq, *so, *sl, final.stride(0), final.stride(1),
        SPLITS=splits, SPLITS_P=_pow2(splits), D=head_dim, D_P=_pow2(head_dim), PDL=pdl,
        num_warps=max(1, min(8, _pow2(splits) * _pow2(head_dim) // 1024)), **_launch(pdl))
    return final
