"""Batch-invariant mode on the CPU: the kernels under Triton's interpreter (float32), the in-place module swaps
on four architectures, and the errors where the mode cannot run. Bitwise identity in bfloat16 across batches and
pipelines is a GPU property: `tests/gpu/test_batch_invariant_gpu.py`.

The kernels module is loaded afresh under Triton's interpreter (tests/interpreted.py)."""

from __future__ import annotations

import pytest
import torch
from interpreted import import_triton_interpreted, interpreted_module

import_triton_interpreted()

import asyncbatch.core as core_pkg  # noqa: E402
from asyncbatch import Engine, EngineConfig  # noqa: E402
from asyncbatch.core.errors import ConfigError, UnsupportedError  # noqa: E402
from asyncbatch.core.fusion import set_fused  # noqa: E402
from asyncbatch.core.invariant import set_batch_invariant, unsupported_modules  # noqa: E402

ARCHITECTURES = ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


@pytest.fixture(scope="module")
def kernels():
    with interpreted_module(core_pkg, "invariant_kernels") as module:
        yield module


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_equals_a_float64_product(kernels, split_k, bias):
    gen = torch.Generator().manual_seed(split_k * 2 + bias)
    x = torch.randn(200, 37, generator=gen).t()  # [37, 200], not contiguous
    w = torch.randn(48, 200, generator=gen)
    b = torch.randn(48, generator=gen) if bias else None
    cfg = kernels.MatmulConfig(block_m=16, block_n=16, block_k=32, split_k=split_k)

    out = kernels.matmul(x, w, b, cfg)

    expected = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert (37, 48) == tuple(out.shape) and torch.float32 == out.dtype
    assert (out.double() - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rms_norm_equals_the_models_own(kernels, model_factory, arch):
    model = model_factory(arch, "float32")
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    gen = torch.Generator().manual_seed(0)
    for norm in norms:
        x = torch.randn(7, 3, norm.weight.shape[0], generator=gen) * 3
        out = kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        assert (out - norm(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_swapped_models_compute_the_same_logits(kernels, model_factory, arch, fused):
    model = model_factory(arch, "float32")
    ids = torch.randint(0, 512, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits
        set_fused(model, fused)
        try:
            assert 0 < set_batch_invariant(model, True)
            swapped = model(ids).logits
            assert 0 == set_batch_invariant(model, True)  # idempotent
        finally:
            set_batch_invariant(model, False)
            set_fused(model, False)
        again = model(ids).logits

    assert (swapped - plain).abs().max().item() < 1e-4
    assert torch.equal(plain, again)
    assert all(type(m).__name__ not in ("InvariantLinear", "InvariantRMSNorm") for m in model.modules())


def test_swaps_cover_every_linear_and_norm_and_reuse_their_twins(model_factory):
    model = model_factory("tiny-qwen3", "float32")  # q_norm and k_norm too
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    norms = sum(type(m).__name__ == "Qwen3RMSNorm" for m in model.modules())
    try:
        assert linears + norms == set_batch_invariant(model, True)
        first = [id(m) for m in model.modules()]
        set_batch_invariant(model, False)
        set_batch_invariant(model, True)
        assert first == [id(m) for m in model.modules()]  # compiled layers keep their guards
        assert 0 == sum(type(m) is torch.nn.Linear for m in model.modules())
    finally:
        set_batch_invariant(model, False)
    assert linears == sum(type(m) is torch.nn.Linear for m in model.modules())


def test_a_model_with_an_unknown_norm_is_refused_by_name(model_factory):
    model = model_factory("tiny", "float32")

    class OddNorm(torch.nn.LayerNorm):
        pass

    model.model.layers[0].extra_norm = OddNorm(8)
    try:
        assert ["OddNorm"] == unsupported_modules(model)
        with pytest.raises(UnsupportedError, match="OddNorm"):
            set_batch_invariant(model, True)
    finally:
        del model.model.layers[0].extra_norm


def test_the_engine_refuses_the_mode_off_cuda_with_the_reason(tiny32):
    with pytest.raises(UnsupportedError, match="engine.batch_invariant needs a CUDA device"):
        Engine.from_model(tiny32, EngineConfig.from_dict({"batch_invariant": True}))


def test_a_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="batch_invariant"):
        EngineConfig.from_dict({"batch_invariant": "maybe"})
