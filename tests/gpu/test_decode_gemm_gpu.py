"""The Triton decode GEMM and programmatic dependent launch on a GPU.

The GEMM is checked against cuBLAS at the 8B shape's projections; PDL is checked where it could go wrong, in
chains of kernels that each read what the one before wrote, captured in a CUDA graph and replayed: the bits must
be those of ordinary launches. Through the engine: the same greedy tokens with either GEMM (float32), and the
same bf16 tokens with PDL on and off.
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


@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (3072, 4096)])
@pytest.mark.parametrize("m", [1, 5, 32, 64])
def test_the_product_agrees_with_cublas_in_bf16(n, k, m):
    from asyncbatch.core import decode_gemm_kernels as kernels

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    exact = F.linear(x.float(), w.float(), b.float())

    actual = kernels.matmul(x, w, b).float()

    scale = exact.abs().max().item()
    assert (actual - exact).abs().max().item() <= 0.01 * scale  # float32 accumulation, one bf16 rounding


def _chain(kernels, x, weights, pdl):
    for w in weights:  # each product reads the one before
        x = kernels.matmul(x, w, pdl=pdl)
    return x


@needs_pdl
@pytest.mark.parametrize("m", [1, 32])
def test_dependent_launches_replayed_from_a_graph_give_the_bits_of_ordinary_ones(m):
    from asyncbatch.core import decode_gemm_kernels as kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) / 64 for _ in range(24)]
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


def test_the_engine_gives_the_same_greedy_tokens_with_either_gemm_in_float32():
    model = _model("float32")
    torch_tokens, state = _generate(model, decode_gemm="torch", pdl="never")
    assert (False, False) == (state.decode_gemm, state.pdl)
    triton_tokens, state = _generate(model, decode_gemm="triton", pdl="never")
    assert state.decode_gemm

    assert torch_tokens == triton_tokens


@needs_pdl
def test_pdl_changes_no_token_in_bf16():
    model = _model("bfloat16")
    plain, state = _generate(model, decode_gemm="triton", pdl="never")
    assert (True, False) == (state.decode_gemm, state.pdl)
    dependent, state = _generate(model, decode_gemm="triton", pdl="always")
    assert (True, True) == (state.decode_gemm, state.pdl)

    assert plain == dependent


def test_auto_runs_triton_with_pdl_only_on_the_cards_measured_faster():
    _, state = _generate(_model("bfloat16"))
    measured = torch.cuda.get_device_name() in decode_gemm.MEASURED_FASTER
    assert (measured, measured) == (state.decode_gemm, state.pdl)


@needs_pdl
def test_pdl_on_the_attention_kernels_beside_cublas_changes_no_token():
    model = _model("bfloat16")
    plain, _ = _generate(model, decode_gemm="torch", pdl="never")
    dependent, state = _generate(model, decode_gemm="torch", pdl="always")
    assert (False, True) == (state.decode_gemm, state.pdl)

    assert plain == dependent
