"""The decode GEMM that streams weight tiles through Hopper's tensor memory accelerator (`engine.decode_gemm: tma`).

Imports triton at import time: import this module lazily (`asyncbatch.core.decode_gemm` does).

A decode step's product has few rows (the batch) and reads every weight byte once, so its time is the weight's
bytes over the bandwidth the kernel keeps busy, plus a ramp-up and a tail. `decode_gemm_kernels` puts the batch on
the MMA's M side and walks K with ordinary loads; on an H200 (4.3 TB/s copy) that keeps too few bytes in flight and
loses to cuBLAS. This kernel swaps the operands: a program owns BLOCK_N weight rows (the MMA's M side, where Hopper's
tensor cores want 64) and the whole batch (N side, 16-32 wide), and each pipeline stage is one bulk tensor copy of a
[BLOCK_N, BLOCK_K] weight tile. Six stages of 24 KiB keep ~150 KiB in flight per SM, so even 64 programs on 132
SMs saturate memory, which is why the rule below prefers few, deep programs over many shallow ones.

Long K (the 8B MLP's down projection, K = 14,336) is split over programs by a rule on K alone. Each split writes
float32 partials; the last split of a column strip to finish (a per-strip counter) sums all of them in split order
and writes the output, then resets its counter for the next launch. So the sum's order never depends on timing or
on the batch: a row's bits are the same whatever else shares its step (up to `MAX_ROWS`).

The epilogue (`_finish`) can also carry a folded RMSNorm (`norm_fold`): add a residual and write the next norm's
numerator with per-strip sums of squares (`matmul_residual`), or divide each row by the rms those sums give
(`matmul_row_scaled`).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

MAX_ROWS = 32  # at 64 rows cuBLAS measured faster on the MLP's gate/up product (H200)
BLOCK_N, BLOCK_K, NUM_WARPS = 64, 128, 4
K_PER_SPLIT = 8192  # longer K ranges are split over programs: one program per SM at the 8B down projection
DEEP, SHALLOW = 6, 4  # stages with at most one program per SM, and with two (2 x 4 x 24 KiB fit one SM)


@triton.jit
def _finish(val, rn, rm, n_ok, M, K, strip, out_ptr, som, b_ptr, res_ptr, srm, gam_ptr, g_ptr, sq_ptr, sc_ptr,
            n_sc, eps, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, RESIDUAL: tl.constexpr,
            NEXT_NORM: tl.constexpr, SC_PAD: tl.constexpr):
    """A finished [BLOCK_N, BLOCK_M] float32 tile to the output, with the folded-norm epilogues (`norm_fold`)."""
    m_ok = rm < M
    mask = n_ok[:, None] & m_ok[None, :]
    if ROW_SCALE:  # this product's input was an RMSNorm's numerator: scale each row by its rsqrt now
        s = tl.arange(0, SC_PAD)
        part = tl.load(sc_ptr + s[:, None] * M + rm[None, :], mask=(s < n_sc)[:, None] & m_ok[None, :], other=0.0)
        val = val * tl.rsqrt(tl.sum(part, axis=0) / K + eps)[None, :]
    if HAS_BIAS:
        val += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y = val.to(out_ptr.dtype.element_ty)
    if RESIDUAL:  # rounded like transformers' `residual + hidden_states`: the product first, then the sum
        res = tl.load(res_ptr + rm[None, :] * srm + rn[:, None], mask=mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[None, :] * som + rn[:, None], y, mask=mask)
    if NEXT_NORM:  # the next RMSNorm's numerator (x * gamma) and this strip's share of each row's sum of squares
        h = y.to(tl.float32)  # zero past N and M: the copies read zeros there, and the masked loads give zeros
        gam = tl.load(gam_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(g_ptr + rm[None, :] * som + rn[:, None], (h * gam[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(sq_ptr + strip * M + rm, tl.sum(h * h, axis=0), mask=m_ok)


@triton.jit
def _weight_rows_matmul(x_desc, w_desc, b_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, som,
                        res_ptr, srm, gam_ptr, g_ptr, sq_ptr, sc_ptr, n_sc, eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                        ROW_SCALE: tl.constexpr = False, RESIDUAL: tl.constexpr = False,
                        NEXT_NORM: tl.constexpr = False, SC_PAD: tl.constexpr = 1):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    strip = tl.program_id(0)
    split = tl.program_id(1)
    rn = strip * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    k_lo = split * K_SPLIT
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):  # past K and M the copies read zeros
        acc = tl.dot(w_desc.load([strip * BLOCK_N, k0]), tl.trans(x_desc.load([0, k0])), acc)
    if SPLITS == 1:
        _finish(acc, rn, rm, n_ok, M, K, strip, out_ptr, som, b_ptr, res_ptr, srm, gam_ptr, g_ptr, sq_ptr, sc_ptr,
                n_sc, eps, HAS_BIAS, ROW_SCALE, RESIDUAL, NEXT_NORM, SC_PAD)
    else:
        parts = part_ptr + rn[:, None] * BLOCK_M + rm[None, :]
        tl.store(parts + split * N * BLOCK_M, acc, mask=n_ok[:, None])
        # Every thread's partial stores are ordered before the one release of the counter; the last split's
        # acquire, and loads that bypass L1, then see all of them.
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + strip, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            tl.store(cnt_ptr + strip, 0)  # ready for the next launch (kernel boundaries order it)
            total = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in tl.static_range(SPLITS):
                total += tl.load(parts + s * N * BLOCK_M, mask=n_ok[:, None], other=0.0, cache_modifier=".cg")
            _finish(total, rn, rm, n_ok, M, K, strip, out_ptr, som, b_ptr, res_ptr, srm, gam_ptr, g_ptr, sq_ptr,
                    sc_ptr, n_sc, eps, HAS_BIAS, ROW_SCALE, RESIDUAL, NEXT_NORM, SC_PAD)


@attrs.frozen
class Plan:
    """Programs of one product: K `splits`, pipeline `stages` of [`block_n`, `block_k`] weight tiles, `num_warps`."""

    splits: int
    stages: int
    block_n: int = BLOCK_N
    block_k: int = BLOCK_K
    num_warps: int = NUM_WARPS


def plan(n: int, k: int, sms: int) -> Plan:
    """The launch for an [.., k] x [n, k]^T product on a card with `sms` multiprocessors.

    Chosen on an H200 at the 8B shape's projections, in CUDA graphs with no weight served from L2: K is split only
    when longer than `K_PER_SPLIT` (splitting 4,096 cost 3% on the o projection: the partials' round trip outweighs
    the extra programs); with at most one program per SM each gets `DEEP` stages, else `SHALLOW` so that two fit."""
    splits = triton.cdiv(k, K_PER_SPLIT)
    programs = triton.cdiv(n, BLOCK_N) * splits
    return Plan(splits, DEEP if programs <= sms else SHALLOW)


def unsupported(x: Any, weight: Any) -> str | None:
    """Why this kernel cannot compute `x @ weight.T`; None when it can (then `matmul` may be called)."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS:
        return f"more than {MAX_ROWS} rows"
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return f"{x.dtype} x {weight.dtype}: bf16 or fp16 only"
    for t in (x.reshape(-1, x.shape[-1]), weight):  # the copy engine's rules for a tensor map
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return "a tensor the copy engine cannot address (unit last stride, 16-byte aligned rows)"
    return None


_COUNTERS: dict[tuple, Any] = {}
_SMS: dict[int, int] = {}


def _counters(weight: Any, strips: int) -> Any:
    """Zeroed int32 counters of `weight`'s column strips, one set per weight: products of one weight never run
    concurrently (an engine computes on one stream, and engines sharing a model take turns)."""
    key = (weight.device, weight.data_ptr(), tuple(weight.shape), strips)
    found = _COUNTERS.get(key)
    if found is None:
        found = _COUNTERS[key] = torch.zeros(strips, device=weight.device, dtype=torch.int32)
    return found


def _sm_count(device: Any) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter on a CPU (tests): an H100's or H200's count
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def matmul(x: Any, weight: Any, bias: Any = None, *, pdl: bool = False, plan_: Plan | None = None) -> Any:
    """`x @ weight.T + bias` for `x` [..., K] that `unsupported` accepts and a `torch.nn.Linear` weight [N, K].
    `plan_`: another launch than `plan`'s (benchmarks)."""
    return _launch(x, weight, bias, pdl, plan_)[0]


def matmul_residual(x: Any, weight: Any, bias: Any, residual: Any, gamma: Any = None, *,
                    pdl: bool = False) -> tuple[Any, Any, Any]:
    """(h, g, sq): h = `residual` + (`x @ weight.T + bias`, rounded), as a decoder layer adds its residual; with the
    next RMSNorm's `gamma`, also its numerator g = h * gamma and sq [strips, rows], each strip of `BLOCK_N`
    columns' float32 sum of h^2 per row (what `matmul_row_scaled` needs); without, g and sq are empty."""
    h, g, sq = _launch(x, weight, bias, pdl, None, residual=residual, gamma=gamma)
    if gamma is None:
        m = h.numel() // max(1, h.shape[-1])
        g, sq = h.new_empty(0, h.shape[-1]), h.new_empty(0, m, dtype=torch.float32)
    return h, g, sq


def matmul_row_scaled(g: Any, sq: Any, weight: Any, bias: Any, eps: float, *, pdl: bool = False) -> Any:
    """RMSNorm then product, for the norm's numerator `g` (x * gamma) and `sq` from `matmul_residual`:
    (`g @ weight.T`) * rsqrt(mean(x^2) + `eps`) per row, + `bias`, with the sum of `sq` over strips in a fixed
    order."""
    return _launch(g, weight, bias, pdl, None, row_scale=(sq, eps))[0]


def _launch(x: Any, weight: Any, bias: Any, pdl: bool, plan_: Plan | None, *, residual: Any = None,
            gamma: Any = None, row_scale: tuple[Any, float] | None = None) -> tuple[Any, Any, Any]:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    p = plan_ or plan(n, k, _sm_count(x.device))
    strips = triton.cdiv(n, p.block_n)
    g = sq = None  # the next norm's numerator and sums of squares: allocated only when asked for
    if gamma is not None:
        g = torch.empty(*lead, n, device=x.device, dtype=x.dtype)
        sq = torch.empty(strips, m, device=x.device, dtype=torch.float32)
    if m == 0:
        return out.view(*lead, n), g, sq
    block_m = max(16, triton.next_power_of_2(m))
    k_split = triton.cdiv(triton.cdiv(k, p.splits), p.block_k) * p.block_k
    splits = triton.cdiv(k, k_split)
    if splits > 1:
        parts = torch.empty(splits, n, block_m, device=x.device, dtype=torch.float32)
        counters = _counters(weight, strips)
    else:
        parts = counters = out
    res = residual.reshape(-1, n) if residual is not None else out
    scale, eps = row_scale if row_scale is not None else (out, 0.0)
    extra = {"launch_pdl": True} if pdl else {}
    _weight_rows_matmul[(strips, splits)](
        TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [block_m, p.block_k]),
        TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [p.block_n, p.block_k]),
        bias if bias is not None else out, out, parts, counters, m, n, k, k_split, out.stride(0),
        res, res.stride(0), gamma if gamma is not None else out, g if g is not None else out,
        sq if sq is not None else out, scale,
        scale.shape[0] if row_scale is not None else 0, eps,
        BLOCK_M=block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k, SPLITS=splits, HAS_BIAS=bias is not None, PDL=pdl,
        ROW_SCALE=row_scale is not None, RESIDUAL=residual is not None, NEXT_NORM=gamma is not None,
        SC_PAD=triton.next_power_of_2(scale.shape[0]) if row_scale is not None else 1,
        num_warps=p.num_warps, num_stages=p.stages, **extra)
    return out.view(*lead, n), g, sq
