"""The folded-norm epilogues of the `tma` decode GEMM (`engine.fold_norms`) under Triton's interpreter on a CPU.

`matmul_residual` must give transformers' rounding of `residual + x W^T` exactly, the next norm's numerator and
per-strip sums of squares; `matmul_row_scaled` must give an RMSNorm followed by the product. The interpreter has no
bfloat16 arithmetic, so everything is in float16; bf16 and speed are the GPU tests' business.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreted import import_triton_interpreted, interpreted_module

import_triton_interpreted()

from asyncbatch import core as core_pkg  # noqa: E402


@pytest.fixture(scope="module")
def tma():
    with interpreted_module(core_pkg, "decode_gemm_tma") as module:
        yield module


def _relative_error(actual, exact):
    return ((actual.double() - exact).norm() / exact.norm()).item()


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 32), n=st.sampled_from([64, 100, 200]), k=st.sampled_from([128, 200, 520]),
       split=st.sampled_from([None, 128]), bias=st.booleans(), gamma=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_residual_epilogue_adds_as_transformers_rounds_and_prepares_the_next_norm(tma, m, n, k, split, bias,
                                                                                     gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).half()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    b = torch.randn(n, generator=gen).half() if bias else None
    residual = (4 * torch.randn(m, n, generator=gen)).half()
    g_weight = torch.rand(n, generator=gen).half() + 0.5 if gamma else None

    with pytest.MonkeyPatch.context() as mp:
        if split:
            mp.setattr(tma, "K_PER_SPLIT", split)
        product = tma.matmul(x, w, b)
        h, g, sq = tma.matmul_residual(x, w, b, residual, g_weight)

    assert torch.equal(residual + product, h)  # the product rounded first, then the sum: transformers' order
    if not gamma:
        assert (0, 0) == (g.numel(), sq.numel())
        return
    hf = h.float()
    assert torch.equal((hf * g_weight.float()).half(), g)
    strips = -(-n // tma.BLOCK_N)
    assert (strips, m) == tuple(sq.shape)
    torch.testing.assert_close(sq.sum(0), hf.square().sum(-1), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 32), n=st.sampled_from([64, 96, 200]), k=st.sampled_from([64, 200, 256]),
       strips=st.integers(1, 9), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_row_scaled_product_is_the_norm_then_the_product(tma, m, n, k, strips, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(m, k, generator=gen)).half()
    gamma = torch.rand(k, generator=gen).half() + 0.5
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    b = torch.randn(n, generator=gen).half() if bias else None
    eps = 1e-5
    g = (h.float() * gamma.float()).half()
    # the sums of squares split over `strips` uneven pieces of the columns, as several producers would leave them
    edges = torch.linspace(0, k, strips + 1).long().tolist()
    sq = torch.stack([h[:, lo:hi].float().square().sum(-1) for lo, hi in zip(edges, edges[1:])])

    actual = tma.matmul_row_scaled(g, sq.contiguous(), w, b, eps)

    hd = h.double()
    normed = hd * torch.rsqrt(hd.square().mean(-1, keepdim=True) + eps) * gamma.double()
    exact = normed @ w.double().T + (b.double() if b is not None else 0)
    assert (m, n) == tuple(actual.shape)
    assert _relative_error(actual, exact) < 3e-3


def test_the_folded_layers_row_limit_is_the_kernels(tma):
    from asyncbatch.core import norm_fold

    assert tma.MAX_ROWS == norm_fold.MAX_ROWS  # more rows would run the torch fallback, slower than not folding
