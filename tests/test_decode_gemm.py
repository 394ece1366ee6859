"""The Triton decode GEMM (`engine.decode_gemm`) and programmatic dependent launch (`engine.pdl`) on a CPU.

The kernel runs under Triton's interpreter against `torch.nn.functional.linear`; the rest checks when the engine
turns each on, the errors for values that cannot be honoured here, and the in-place swap of a model's layers.
"""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreted import import_triton_interpreted, interpreted_module

import_triton_interpreted()

from asyncbatch import core as core_pkg  # noqa: E402
from asyncbatch.core import decode_gemm  # noqa: E402
from asyncbatch.core.config import EngineConfig, ModelConfig  # noqa: E402
from asyncbatch.core.errors import UnsupportedError  # noqa: E402
from asyncbatch.core.fusion import set_fused  # noqa: E402
from asyncbatch.core.models import build_model  # noqa: E402
from asyncbatch.core.plugin_host import get_plugin_host  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    with interpreted_module(core_pkg, "decode_gemm_kernels") as module:
        yield module


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 64), n=st.sampled_from([1, 31, 32, 97, 200]), k=st.sampled_from([8, 128, 200, 384]),
       bias=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_product_is_torchs_linear(kernels, m, n, k, bias, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if strided else k, generator=gen)[:, :k]  # a view with a row stride of 2k
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    expected = F.linear(x, w, b)

    actual = kernels.matmul(x, w, b)

    assert expected.shape == actual.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_leading_dimensions_are_kept_and_too_many_rows_are_refused(kernels):
    x = torch.randn(2, 3, 128)
    w = torch.randn(40, 128)
    torch.testing.assert_close(kernels.matmul(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="at most 64 rows, got 65"):
        kernels.matmul(torch.randn(65, 128), w)


def test_the_tile_follows_the_width_and_fits_shared_memory(kernels):
    assert kernels.Tile(64, 256, 4, 3) == kernels.tile(32, 28672)
    assert kernels.Tile(16, 128, 4, 4) == kernels.tile(32, 6144)
    assert kernels.Tile(16, 256, 4, 4) == kernels.tile(32, 4096)
    for rows in (1, 16, 32, 64):
        for n in (1, 4096, 6144, 28672, 128256):
            for size in (2, 4):
                t = kernels.tile(rows, n, size)
                block_m = max(16, 1 << (rows - 1).bit_length())
                assert t.num_stages * (block_m + t.block_n) * t.block_k * size <= kernels.SHARED_MEMORY_BUDGET
                assert t.num_stages >= 2 and t.block_k >= 32


def _config(**kw):
    return EngineConfig.from_dict(kw)


CPU = torch.device("cpu")


def test_auto_leaves_both_off_where_they_cannot_run():
    assert ("torch", False) == decode_gemm.decide(_config(), CPU)
    assert ("torch", False) == decode_gemm.decide(_config(decode_gemm="torch", pdl="never"), CPU)


@pytest.fixture
def card(monkeypatch):
    """Pretend the device is a Hopper CUDA card of the given name, where every kernel and PDL can run."""
    def use(name):
        monkeypatch.setattr(decode_gemm, "unsupported_reason", lambda device, **kw: None)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return use


@pytest.mark.parametrize("kw, expected", [
    ({}, ("triton", True)),
    ({"pdl": "never"}, ("triton", False)),
    ({"decode_gemm": "torch"}, ("torch", False)),  # PDL beside cuBLAS alone measured no gain
    ({"decode_gemm": "torch", "pdl": "always"}, ("torch", True)),
    ({"decode_gemm": "tma"}, ("tma", False)),  # not measured with PDL on this card
    ({"batch_invariant": True}, ("torch", False)),  # its GEMMs are its own
])
def test_auto_on_an_h100_runs_the_row_kernel_with_pdl(card, kw, expected):
    card("NVIDIA H100 80GB HBM3")
    assert expected == decode_gemm.decide(_config(**kw), CPU)


@pytest.mark.parametrize("kw, expected", [
    ({}, ("tma", False)),
    ({"pdl": "always"}, ("tma", True)),
    ({"decode_gemm": "triton"}, ("triton", True)),  # asked for: PDL follows where the card supports it
    ({"decode_gemm": "triton", "pdl": "never"}, ("triton", False)),
    ({"batch_invariant": True}, ("torch", False)),
])
def test_auto_on_an_h200_runs_the_tma_kernel_without_pdl(card, kw, expected):
    card("NVIDIA H200")
    assert expected == decode_gemm.decide(_config(**kw), CPU)


@pytest.mark.parametrize("card_name", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_auto_keeps_cublas_where_steps_are_launched_from_python(card, card_name):
    card(card_name)
    assert ("torch", False) == decode_gemm.decide(_config(), CPU, captured=False)
    assert ("tma", False) == decode_gemm.decide(_config(decode_gemm="tma"), CPU, captured=False)  # asked for


@pytest.mark.parametrize("kw, expected", [({}, ("torch", False)), ({"decode_gemm": "triton"}, ("triton", True))])
def test_auto_keeps_cublas_on_cards_not_measured(card, kw, expected):
    card("NVIDIA H100 PCIe")
    assert expected == decode_gemm.decide(_config(**kw), CPU)


def test_the_tma_kernel_on_a_card_older_than_hopper_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda", 0)
    assert ("torch", False) == decode_gemm.decide(_config(), cuda)
    assert ("triton", False) == decode_gemm.decide(_config(decode_gemm="triton"), cuda)
    with pytest.raises(UnsupportedError, match=r"engine.decode_gemm: 'tma' needs compute capability >= 9.0 "
                                               r"\(Hopper\) for the tensor memory accelerator; NVIDIA A100-SXM4-80GB has 8.0"):
        decode_gemm.decide(_config(decode_gemm="tma"), cuda)


@pytest.mark.parametrize("kw, fragment", [
    ({"decode_gemm": "triton"}, "engine.decode_gemm: 'triton' needs a CUDA device, the model is on cpu"),
    ({"pdl": "always"}, "engine.pdl: 'always' needs a CUDA device, the model is on cpu"),
    ({"decode_gemm": "tma"}, "engine.decode_gemm: 'tma' needs a CUDA device, the model is on cpu"),
    ({"decode_gemm": "triton", "batch_invariant": True}, "cannot be combined with engine.batch_invariant"),
    ({"decode_gemm": "tma", "batch_invariant": True}, "'tma' cannot be combined with engine.batch_invariant"),
])
def test_a_value_that_cannot_run_here_says_why(kw, fragment):
    with pytest.raises(UnsupportedError, match=fragment):
        decode_gemm.decide(_config(**kw), CPU)


def _tiny():
    model, _ = build_model(ModelConfig(preset="tiny", dtype="float32", device="cpu"), get_plugin_host())
    return model.eval()


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_the_swap_covers_every_layer_linear_but_the_output_embedding_and_is_undone():
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    before = _linears(model)
    with torch.no_grad():
        expected = model(ids).logits

        assert len(before) - 1 == decode_gemm.set_decode_gemm(model, "triton", pdl=True)
        assert [model.get_output_embeddings()] == _linears(model)
        assert 0 == decode_gemm.set_decode_gemm(model, "triton", pdl=True)  # idempotent
        twins = [m for m in model.modules() if type(m).__name__ == "DecodeLinear"]
        assert len(before) - 1 == len(twins) and all(t.pdl for t in twins)
        assert len(twins) == decode_gemm.set_decode_gemm(model, "tma")  # another kernel: every twin changes
        assert {("tma", False)} == {(t.kernel, t.pdl) for t in model.modules() if type(t).__name__ == "DecodeLinear"}
        swapped = model(ids).logits  # on a CPU the op computes F.linear

        assert len(before) - 1 == decode_gemm.set_decode_gemm(model, "torch")
        assert before == _linears(model)  # the very same modules
    assert torch.equal(expected, swapped)


def test_fused_groups_take_the_op_and_give_back_only_what_was_theirs():
    model = _tiny()
    groups = set_fused(model, True)
    firsts = [m for m in model.modules() if type(m).__name__ == "FusedProjection" and m.index == 0]
    assert groups == len(firsts)

    decode_gemm.set_decode_gemm(model, "triton", pdl=False)
    assert all(f.group.linear is decode_gemm.ops()["linear"]["triton", False] for f in firsts)
    decode_gemm.set_decode_gemm(model, "triton", pdl=True)
    assert all(f.group.linear is decode_gemm.ops()["linear"]["triton", True] for f in firsts)
    decode_gemm.set_decode_gemm(model, "tma", pdl=False)
    assert all(f.group.linear is decode_gemm.ops()["linear"]["tma", False] for f in firsts)
    decode_gemm.set_decode_gemm(model, "torch")
    assert all(f.group.linear is None for f in firsts)

    other = object()  # another mode's GEMM (batch-invariant) is neither replaced nor undone
    firsts[0].group.linear = other
    decode_gemm.set_decode_gemm(model, "triton")
    decode_gemm.set_decode_gemm(model, "torch")
    assert other is firsts[0].group.linear


def test_a_cpu_engine_keeps_torchs_gemms():
    from asyncbatch import Engine

    engine = Engine.from_model(_tiny(), attrs.evolve(_config(), model=ModelConfig(preset="tiny")))
    assert ("torch", False) == (engine.model_state.decode_gemm, engine.model_state.pdl)
