"""Folded RMSNorms (`engine.fold_norms`) on a CPU, where the two ops run their torch arithmetic: the folded layers
give the unfolded logits (float64, within the norms' float32) and tokens on every foldable architecture, compiled
or not; steps of more rows than the kernel takes run the layer's own forward; folding switches on and off in place;
what cannot be folded says why, and `always` fails where `auto` would quietly not fold."""

from __future__ import annotations

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core import decode_gemm
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.decode_gemm import set_decode_gemm
from asyncbatch.core.errors import UnsupportedError
from asyncbatch.core.fusion import set_fused
from asyncbatch.core.models import build_model
from asyncbatch.core.norm_fold import set_norm_fold, unsupported_reason
from asyncbatch.core.plugin_host import get_plugin_host

PRESETS = ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
PROMPTS = [[(7 * i + j) % 300 + 1 for j in range(3 + 4 * i)] for i in range(5)]


def _model(preset: str = "tiny", dtype: str = "float64", **overrides):
    model, _ = build_model(ModelConfig(preset=preset, dtype=dtype, device="cpu", overrides=overrides),
                           get_plugin_host())
    return model


def test_a_llama_with_biases_everywhere_folds_to_the_same_logits():
    model = _model("tiny", attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        biases = [p for name, p in model.named_parameters() if name.endswith("_proj.bias")]
        assert 2 * 7 == len(biases)  # q, k, v, o, gate, up, down in each of 2 layers
        for bias in biases:  # the random init leaves them at zero: make them count
            bias.normal_(0, 0.5)
        _ready(model)
        ids = torch.tensor([[5, 9, 33, 2, 7]])
        plain = model(ids).logits
        set_norm_fold(model, True)
        folded = model(ids).logits

    torch.testing.assert_close(folded, plain, rtol=1e-6, atol=1e-6)


def _ready(model):
    """Fused projections and the tma decode GEMM's modules (on a CPU their op computes with F.linear)."""
    set_fused(model, True)
    set_decode_gemm(model, "tma")
    return model


def _folded_layers(model) -> int:
    return sum("forward" in layer.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_folded_layers_give_the_unfolded_logits(preset, compiled):
    model = _ready(_model(preset))
    short = torch.tensor([[5, 9, 33, 2, 7, 100, 3]])  # 7 rows: the folded path
    long = torch.arange(1, 41).reshape(1, 40)  # 40 rows: more than the kernel takes, the layer's own forward
    with torch.no_grad():
        plain_short, plain_long = model(short).logits, model(long).logits
        assert len(model.model.layers) == set_norm_fold(model, True)
        if compiled:
            for layer in model.model.layers:
                layer.compile(dynamic=True)
        folded_short, folded_long = model(short).logits, model(long).logits
        for layer in model.model.layers:
            layer._compiled_call_impl = None

    # transformers' RMSNorm computes in float32 even in a float64 model; the folded one divides after the product
    torch.testing.assert_close(folded_short, plain_short, rtol=1e-6, atol=1e-6)
    assert not torch.equal(folded_short, plain_short)  # it did run the folded arithmetic
    if not compiled:
        assert torch.equal(folded_long, plain_long)  # the same modules and ops, in the same order


def test_unfolding_gives_the_model_back_as_it_was():
    model = _ready(_model())
    types_before = [type(m) for m in model.modules()]
    keys = model.state_dict().keys()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        before = model(ids).logits
        set_norm_fold(model, True)
        assert 0 == set_norm_fold(model, True)  # idempotent
        assert 2 == _folded_layers(model)
        assert 2 == set_norm_fold(model, False)
        assert 0 == set_norm_fold(model, False)
        after = model(ids).logits

    assert 0 == _folded_layers(model)
    assert types_before == [type(m) for m in model.modules()]
    assert keys == model.state_dict().keys()
    assert torch.equal(before, after)


def test_what_cannot_be_folded_says_why():
    model = _model()
    assert "not a fused projection group" in unsupported_reason(model)
    set_fused(model, True)
    assert "not the tma decode GEMM" in unsupported_reason(model)
    set_decode_gemm(model, "tma")
    assert unsupported_reason(model) is None
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
    assert "layer 1's norms are not the Llama RMSNorm" == unsupported_reason(model)
    with pytest.raises(ValueError, match="cannot fold the norms of LlamaForCausalLM"):
        set_norm_fold(model, True)


def test_a_layer_of_another_shape_is_not_folded():
    model = _ready(_model("tiny", "float32"))
    layer = model.model.layers[0]
    layer.__class__ = type("GemmaLikeDecoderLayer", (type(layer),), {})
    assert unsupported_reason(model).startswith("GemmaLikeDecoderLayer is not a decoder layer of known shape")


def _engine_tokens(model, fold: str, compile_mode: str):
    cfg = EngineConfig.from_dict({"runtime": "cpu", "fuse_projections": "always", "compile": compile_mode,
                                  "fold_norms": fold, "cache": {"num_blocks": 100, "block_size": 8}})
    engine = Engine.from_model(model, cfg)
    try:
        tokens = [o.token_ids for o in engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))]
        return tokens, engine.model_state.fold_norms, _folded_layers(model)
    finally:
        engine.release()


@pytest.mark.parametrize("compile_mode", ["none", "layers"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_the_engine_folds_where_asked_and_keeps_its_tokens(preset, compile_mode, monkeypatch):
    monkeypatch.setattr(decode_gemm, "decide", lambda config, device, captured=True: ("tma", False))
    model = _model(preset)
    reference, state, folded = _engine_tokens(model, "never", compile_mode)
    assert ("never", 0) == (state, folded)

    tokens, state, folded = _engine_tokens(model, "always", compile_mode)

    assert ("always", 2) == (state, folded)  # folded while the engine ran
    assert reference == tokens
    assert 0 == _folded_layers(model)  # and given back unfolded


def test_always_fails_where_auto_does_not_fold():
    model = _model("tiny", "float32")  # a CPU: the decode GEMM is cuBLAS's (torch), so nothing can be folded
    auto = Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu", "cache": {"num_blocks": 64}}))
    assert "never" == auto.model_state.fold_norms
    auto.release()

    with pytest.raises(UnsupportedError, match=r"engine.fold_norms: 'always' needs the tma decode GEMM .*"
                                               r"decode_gemm 'torch'.*valid here: auto, never"):
        Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu", "fold_norms": "always",
                                                         "cache": {"num_blocks": 64}}))


def test_always_fails_on_a_model_it_cannot_fold(monkeypatch):
    monkeypatch.setattr(decode_gemm, "decide", lambda config, device, captured=True: ("tma", False))
    model = _model("tiny", "float32")
    model.model.layers[0].input_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
    cfg = {"runtime": "cpu", "fuse_projections": "always", "compile": "none", "cache": {"num_blocks": 64}}
    engine = Engine.from_model(model, EngineConfig.from_dict(cfg))  # auto: runs unfolded
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert 0 == _folded_layers(model)
    engine.release()

    with pytest.raises(UnsupportedError, match="engine.fold_norms: 'always' cannot fold here: layer 0's norms"):
        engine = Engine.from_model(model, EngineConfig.from_dict({**cfg, "fold_norms": "always"}))
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True))
