"""Gated MLP twins (`engine.fuse_activation`): which MLPs are swapped, that the swap keeps the model's output and
parameters, and that it is undone. On a CPU the op computes the fused product with `F.linear` and the activation
after it; the epilogue kernel itself is checked in `test_decode_gemm_tma.py` and on the GPU."""

from __future__ import annotations

import types

import attrs
import pytest
import torch

from asyncbatch.core import decode_gemm, model_state
from asyncbatch.core.config import EngineConfig, ModelConfig
from asyncbatch.core.fusion import set_fused
from asyncbatch.core.gated_mlp import set_gated_mlp
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host


def _tiny(preset="tiny"):
    model, _ = build_model(ModelConfig(preset=preset, dtype="float32", device="cpu"), get_plugin_host())
    return model.eval()


def _mlps(model):
    return [layer.mlp for layer in model.model.layers]


def _twins(model):
    return [m for m in model.modules() if type(m).__name__ == "GatedMLP"]


def _parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def test_every_fused_silu_mlp_is_swapped_with_the_same_output_and_parameters_and_given_back():
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
        originals = _mlps(model)
        set_fused(model, True)
        decode_gemm.set_decode_gemm(model, "tma")
        count = _parameter_count(model)

        assert len(originals) == set_gated_mlp(model, "tma")
        assert 0 == set_gated_mlp(model, "tma")  # idempotent
        assert len(originals) == len(_twins(model)) and count == _parameter_count(model)
        swapped = model(ids).logits

        assert len(originals) == set_gated_mlp(model, "tma", pdl=True)  # another launch: every twin changes
        assert {("tma", True)} == {(t.kernel, t.pdl) for t in _twins(model)}
        assert len(originals) == set_gated_mlp(model, "torch")
        assert originals == _mlps(model)  # the very same modules
        decode_gemm.set_decode_gemm(model, "torch")
        set_fused(model, False)
        again = model(ids).logits
    assert torch.allclose(expected, swapped, atol=1e-5, rtol=1e-5)
    assert torch.equal(expected, again)


def test_unfused_projections_are_left_alone():
    model = _tiny()
    assert 0 == set_gated_mlp(model, "tma")
    assert [] == _twins(model)


def test_an_mlp_with_another_activation_keeps_its_forward():
    model = _tiny()
    for mlp in _mlps(model):
        mlp.act_fn = torch.nn.GELU()
    set_fused(model, True)
    assert 0 == set_gated_mlp(model, "tma")


def test_an_mlp_whose_forward_does_something_else_is_refused_by_the_probe():
    """Same submodules, SiLU included, but a forward that scales the product: only the probe can tell."""
    model = _tiny()
    first = _mlps(model)[0]
    first.forward = types.MethodType(lambda self, x: self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)
                                                                    * 2), first)
    set_fused(model, True)
    assert len(_mlps(model)) - 1 == set_gated_mlp(model, "tma")
    assert first is model.model.layers[0].mlp
    assert 0 == set_gated_mlp(model, "tma")  # the verdict is kept


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="valid are torch, tma"):
        set_gated_mlp(_tiny(), "triton")


@pytest.mark.parametrize("kw, gemm, expected", [
    ({}, "tma", True),
    ({"fuse_activation": "never"}, "tma", False),
    ({"fuse_projections": "never"}, "tma", False),
    ({}, "triton", False),  # the row kernel has no gated epilogue
    ({}, "torch", False),
])
def test_the_engine_wants_gated_mlps_with_fused_projections_and_the_tma_kernel(monkeypatch, kw, gemm, expected):
    monkeypatch.setattr(decode_gemm, "decide", lambda config, device, captured=True: (gemm, False))
    runtime = types.SimpleNamespace(graph_support="native", device=torch.device("cuda"))
    config = attrs.evolve(EngineConfig(model=ModelConfig(preset="tiny")), **kw)
    assert expected == model_state.decide(config, runtime, "mixed").gated


def test_a_bad_value_names_the_key_and_the_choices():
    from asyncbatch.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fuse_activation.*valid: auto, never"):
        EngineConfig.from_dict({"fuse_activation": "always"})
