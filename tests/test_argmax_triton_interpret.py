"""The sampler's chunked Triton argmax against `torch.argmax`, under Triton's interpreter on the CPU.

Rows are drawn from a handful of values so that ties are common, and span one to three chunks, so both the
within-chunk and the across-chunk tie-breaks are exercised. The module name sorts before every test that imports
triton without the interpreter (see `interpreted`).
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
def kernels():
    with interpreted_module(core_pkg, "argmax_kernels") as module:
        yield module


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), n=st.sampled_from([1, 7, 2047, 2048, 2049, 4100, 6144]),
       levels=st.integers(1, 6), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_the_index_of_each_rows_first_maximum_as_torch_argmax(kernels, rows, n, levels, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (rows, n), generator=gen).to(dtype)  # few values: many ties
    expected = torch.argmax(x, dim=-1).to(torch.int32)
    assert expected.tolist() == kernels.row_argmax(x).tolist()


def test_a_tie_across_chunks_goes_to_the_earlier_chunk(kernels):
    x = torch.zeros(2, 3 * kernels.CHUNK)
    x[0, [5000, 100, 3000]] = 7.0
    x[1, [2 * kernels.CHUNK, kernels.CHUNK + 1]] = 1.0
    assert [100, kernels.CHUNK + 1] == kernels.row_argmax(x).tolist()


def test_nan_wins_and_the_first_nan_is_taken_as_in_torch(kernels):
    x = torch.randn(4, 5000)
    x[0, 4000] = float("nan")
    x[0, 4500] = float("nan")
    x[1, 10] = float("inf")
    x[1, 3000] = float("nan")
    x[2] = float("-inf")  # nothing larger than -inf: the first position
    x[3, 2100] = float("inf")
    assert torch.argmax(x, dim=-1).tolist() == kernels.row_argmax(x).tolist() == [4000, 3000, 0, 2100]


def test_rows_with_a_stride_are_read_in_place(kernels):
    base = torch.randn(3, 2 * 4100)
    x = base[:, ::2]  # a column stride of 2: copied to a contiguous tensor first
    y = base[:, :4100]  # a row stride of 8200, unit columns: read as is
    assert torch.argmax(x, dim=-1).tolist() == kernels.row_argmax(x).tolist()
    assert torch.argmax(y, dim=-1).tolist() == kernels.row_argmax(y).tolist()


def test_no_rows_gives_an_empty_result(kernels):
    out = kernels.row_argmax(torch.zeros(0, 10))
    assert (torch.int32, (0,)) == (out.dtype, tuple(out.shape))


def test_the_sampler_uses_torch_argmax_off_cuda_with_the_same_dtype():
    from asyncbatch.core.sampling import argmax_rows

    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]])
    out = argmax_rows(x)
    assert (torch.int32, [1, 0]) == (out.dtype, out.tolist())
