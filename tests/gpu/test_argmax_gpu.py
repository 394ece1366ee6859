"""The sampler's chunked argmax on a GPU: `torch.argmax`'s indices exactly, ties and NaN included, and inside a
captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

from asyncbatch.core.sampling import argmax_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 128256), (32, 128256), (256, 151936), (7, 1000), (3, 2048)])
def test_the_indices_of_torch_argmax_with_ties_everywhere(dtype, rows, vocab):
    gen = torch.Generator(device="cuda").manual_seed(rows * vocab)
    x = torch.randint(0, 5, (rows, vocab), device="cuda", generator=gen).to(dtype)  # ties within and across chunks
    assert torch.argmax(x, dim=-1).tolist() == argmax_rows(x).tolist()
    y = torch.randn(rows, vocab, device="cuda", generator=gen).to(dtype)
    y[0, vocab // 2] = float("nan")
    y[-1, vocab - 1] = float("inf")
    assert torch.argmax(y, dim=-1).tolist() == argmax_rows(y).tolist()


def test_replayed_from_a_cuda_graph_it_follows_new_inputs():
    x = torch.randn(32, 128256, device="cuda", dtype=torch.bfloat16)
    argmax_rows(x)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = argmax_rows(x)
    for seed in range(3):
        x.copy_(torch.randn(32, 128256, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert torch.argmax(x, dim=-1).tolist() == out.tolist()
