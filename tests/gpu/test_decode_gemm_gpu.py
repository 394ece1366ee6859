"""The Triton decode GEMMs (`triton`, `tma`) and programmatic dependent launch on a GPU.

Each GEMM is checked against cuBLAS at the 8B shape's projections; PDL is checked where it could go wrong, in
chains of kernels that each read what the one before wrote, captured in a CUDA graph and replayed: the bits must
be those of ordinary launches. The split-K partials of `tma` must leave the same bits at every replay. Through the
engine: the same greedy tokens with the row kernel and cuBLAS (float32), and the same bf16 tokens with PDL on and
off, for both kernels.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core import decode_gemm
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _hopper() -> bool:
    return torch.cuda.get_device_capability() >= (9, 0)


needs_pdl = pytest.mark.skipif(not torch.cuda.is_available() or not _hopper(),
                               reason="programmatic dependent launch needs compute capability >= 9.0")


def _kernels(name):
    from asyncbatch.core import decode_gemm_kernels, decode_gemm_tma

    return {"triton": decode_gemm_kernels, "tma": decode_gemm_tma}[name]


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or not _hopper(),
                                  reason="needs compute capability >= 9.0")
KERNELS = ["triton", pytest.param("tma", marks=needs_hopper)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 4096),
                                  (1000, 1000)])
@pytest.mark.parametrize("m", [1, 5, 32, 64])
def test_the_product_agrees_with_cublas_in_bf16(kernel, n, k, m):
    kernels = _kernels(kernel)
    x = torch.randn(m, k + 8, device="cuda", dtype=torch.bfloat16)[:, :k]  # a view with a longer row stride
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    exact = F.linear(x.float(), w.float(), b.float())
    if kernel == "tma" and kernels.unsupported(x, w) is not None:
        assert m > kernels.MAX_ROWS or k % 8  # the op gives those to cuBLAS
        return

    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(kernels.matmul(x, w, b))

    scale = exact.abs().max().item()
    assert (out.float() - exact).abs().max().item() <= 0.01 * scale  # float32 accumulation, one bf16 rounding


def _chain(kernels, x, weights, pdl):
    for w in weights:  # each product reads the one before
        x = kernels.matmul(x, w, pdl=pdl)
    return x


@needs_pdl
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [1, 32])
@pytest.mark.parametrize("k", [4096, 14336])  # 14,336: `tma` splits K, and the counters must reset every time
def test_dependent_launches_replayed_from_a_graph_give_the_bits_of_ordinary_ones(kernel, m, k):
    kernels = _kernels(kernel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(k, 4096) if i % 2 == 0 else (4096, k) for i in range(12)]  # 4096 -> k -> 4096 ...
    weights = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) / shape[1] ** 0.5
               for shape in shapes]
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    expected = _chain(kernels, x, weights, pdl=False)

    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _chain(kernels, static_x, weights, pdl=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(kernels, static_x, weights, pdl=True)
    for _ in range(20):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(expected, out)


def _model(dtype: str):
    model, _ = build_model(ModelConfig(preset="small", dtype=dtype, device="cuda"), get_plugin_host())
    return model


def _generate(model, **engine):
    rng = random.Random(0)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(5, 120))] for _ in range(24)]
    cfg = EngineConfig.from_dict({"runtime": "cuda", "batch": {"max_tokens": 512, "max_seqs": 24},
                                  "cache": {"num_blocks": 512, "block_size": 16}, **engine})
    eng = Engine.from_model(model, cfg)
    out = [o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))]
    return out, eng.model_state


def test_the_engine_gives_the_same_greedy_tokens_with_the_row_kernel_and_cublas_in_float32():
    model = _model("float32")
    torch_tokens, state = _generate(model, decode_gemm="torch", pdl="never")
    assert ("torch", False) == (state.decode_gemm, state.pdl)
    triton_tokens, state = _generate(model, decode_gemm="triton", pdl="never")
    assert "triton" == state.decode_gemm

    assert torch_tokens == triton_tokens


@needs_pdl
@pytest.mark.parametrize("kernel", ["triton", "tma"])
def test_pdl_changes_no_token_in_bf16(kernel):
    model = _model("bfloat16")
    plain, state = _generate(model, decode_gemm=kernel, pdl="never")
    assert (kernel, False) == (state.decode_gemm, state.pdl)
    dependent, state = _generate(model, decode_gemm=kernel, pdl="always")
    assert (kernel, True) == (state.decode_gemm, state.pdl)

    assert plain == dependent


@needs_hopper
def test_the_tma_kernel_gives_cublas_tokens_until_a_near_tie_in_bf16():
    model = _model("bfloat16")
    cublas, _ = _generate(model, decode_gemm="torch", pdl="never")
    tma, state = _generate(model, decode_gemm="tma")
    assert "tma" == state.decode_gemm
    # Rounding differs, so a greedy near-tie may flip a token and the rest follows; most requests start alike.
    agree = sum(a[:8] == b[:8] for a, b in zip(cublas, tma, strict=True))
    assert agree >= len(cublas) * 3 // 4


def test_auto_runs_the_kernel_measured_fastest_on_this_card():
    _, state = _generate(_model("bfloat16"))
    expected = decode_gemm.MEASURED_FASTER.get(torch.cuda.get_device_name(), ("torch", False))
    assert expected == (state.decode_gemm, state.pdl)


@needs_pdl
def test_pdl_on_the_attention_kernels_beside_cublas_changes_no_token():
    model = _model("bfloat16")
    plain, _ = _generate(model, decode_gemm="torch", pdl="never")
    dependent, state = _generate(model, decode_gemm="torch", pdl="always")
    assert ("torch", True) == (state.decode_gemm, state.pdl)

    assert plain == dependent
