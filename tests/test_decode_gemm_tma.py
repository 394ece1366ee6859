"""The tensor-memory-accelerator decode GEMM (`engine.decode_gemm: tma`) under Triton's interpreter on a CPU.

The interpreter has no bfloat16 arithmetic, so the product is checked in float16 against float64; the plan's rule,
the kernel's limits and the split-K counters are checked directly. Speed and bf16 are the GPU tests' business.
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


def _relative_error(actual, x, w, b):
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
    return ((actual.double() - exact).norm() / exact.norm()).item()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 32), n=st.sampled_from([8, 64, 100, 200]), k=st.sampled_from([8, 128, 200, 520]),
       split=st.sampled_from([None, 128, 256]), bias=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_the_product_is_the_exact_one_within_float16_rounding(tma, m, n, k, split, bias, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if strided else k, generator=gen).half()[:, :k]  # a view with a row stride of 2k
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).half()
    b = torch.randn(n, generator=gen).half() if bias else None
    assert tma.unsupported(x, w) is None

    with pytest.MonkeyPatch.context() as mp:
        if split:  # shorter K ranges per program, so that small K is split too
            mp.setattr(tma, "K_PER_SPLIT", split)
        actual = tma.matmul(x, w, b)

    assert (m, n) == tuple(actual.shape)
    assert _relative_error(actual, x, w, b) < 2e-3


def test_split_partials_are_summed_once_and_the_counters_are_left_at_zero(tma, monkeypatch):
    monkeypatch.setattr(tma, "K_PER_SPLIT", 128)
    monkeypatch.setattr(tma, "_COUNTERS", {})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 512, generator=gen).half()
    w = (torch.randn(130, 512, generator=gen) / 512 ** 0.5).half()
    first = tma.matmul(x, w)
    again = tma.matmul(x, w)  # the counters must have been reset, or no split would find itself last

    assert torch.equal(first, again)
    assert _relative_error(first, x, w, None) < 2e-3
    assert [[0, 0, 0]] == [c.tolist() for c in tma._COUNTERS.values()]  # one counter per strip of 64 columns


def test_leading_dimensions_are_kept_and_no_rows_give_an_empty_product(tma):
    x = torch.randn(2, 3, 64).half()
    w = torch.randn(16, 64).half()
    assert (2, 3, 16) == tuple(tma.matmul(x, w).shape)
    assert (0, 16) == tuple(tma.matmul(torch.randn(0, 64).half(), w).shape)


def test_the_plan_at_the_8b_shapes_is_the_one_measured_fastest_on_an_h200(tma):
    sms = 132
    assert tma.Plan(1, 6) == tma.plan(6144, 4096, sms)  # fused q/k/v: 96 programs, one per SM, deep
    assert tma.Plan(1, 6) == tma.plan(4096, 4096, sms)  # o: splitting K cost 3%
    assert tma.Plan(1, 4) == tma.plan(28672, 4096, sms)  # fused gate/up: 448 programs, two per SM
    assert tma.Plan(2, 6) == tma.plan(4096, 14336, sms)  # down: K split in two, 128 programs


@pytest.mark.parametrize("x, w, fragment", [
    (torch.randn(33, 64).half(), torch.randn(16, 64).half(), "more than 32 rows"),
    (torch.randn(4, 64), torch.randn(16, 64), "torch.float32 x torch.float32: bf16 or fp16 only"),
    (torch.randn(4, 64).half(), torch.randn(16, 64).bfloat16(), "bf16 or fp16 only"),
    (torch.randn(4, 100).half(), torch.randn(16, 100).half(), "16-byte aligned rows"),
    (torch.randn(64, 4).half().T, torch.randn(16, 64).half(), "unit last stride"),
])
def test_what_the_kernel_cannot_compute_is_named(tma, x, w, fragment):
    assert fragment in tma.unsupported(x, w)


@pytest.mark.parametrize("plan", [(1, 2, 32, 64, 4), (3, 3, 128, 32, 8), (2, 4, 16, 128, 1)])
def test_another_launch_computes_the_same_product(tma, plan):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 320, generator=gen).half()
    w = (torch.randn(90, 320, generator=gen) / 320 ** 0.5).half()
    assert _relative_error(tma.matmul(x, w, plan_=tma.Plan(*plan)), x, w, None) < 2e-3
