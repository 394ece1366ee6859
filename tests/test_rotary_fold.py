"""The rotary embedding moved into the attention backend (`engine.fuse_rotary`) on a CPU. The `sdpa` backend does
not rotate by itself, so these tests give it the contract (`applies_rotary`: rotate with the given cos and sin rows,
then attend): the attention modules' replacement forward then gives the class forward's tokens on every family it
covers, compiled or not, hands the backend q and k unrotated with the step's cos and sin, and is given back when
the engine is released; a backend without the contract, or a layer of another family, keeps the model's rotary,
and `always` fails there with the reason."""

from __future__ import annotations

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.attention_api import apply_rotary
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.errors import UnsupportedError
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.core.rotary_fold import set_rotary_fused, unsupported_reason
from asyncbatch.strategies.attention.sdpa import Sdpa

PROMPTS = [[(7 * i + j) % 300 + 1 for j in range(3 + 4 * i)] for i in range(5)]


def _model(preset: str = "tiny", dtype: str = "float64"):
    model, _ = build_model(ModelConfig(preset=preset, dtype=dtype, device="cpu"), get_plugin_host())
    return model


@pytest.fixture
def rotating_sdpa(monkeypatch):
    """Sdpa with the `applies_rotary` contract; returns the sliding window of each call given `rotary`."""
    calls = []
    plain = Sdpa.forward

    def forward(self, q, k, v, k_cache, v_cache, meta, *, scale, sliding_window, rotary=None):
        if rotary is not None:
            calls.append(sliding_window)
            assert rotary[0].shape == (q.shape[0], q.shape[-1])  # one row per token of the step
            q, k = apply_rotary(q, k, *rotary)
        return plain(self, q, k, v, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window)

    monkeypatch.setattr(Sdpa, "applies_rotary", True)
    monkeypatch.setattr(Sdpa, "forward", forward)
    return calls


def _fused_modules(model) -> int:
    return sum("_asyncbatch_rotary" in layer.self_attn.__dict__ for layer in model.model.layers)


def _tokens(model, fuse: str, compile_mode: str, prompts=PROMPTS, **extra):
    cfg = EngineConfig.from_dict({"runtime": "cpu", "attention": "sdpa", "compile": compile_mode,
                                  "fuse_rotary": fuse, "cache": {"num_blocks": 100, "block_size": 8}, **extra})
    engine = Engine.from_model(model, cfg)
    seen = []
    try:
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
        seen.append(_fused_modules(model))
        return [o.token_ids for o in outputs], seen
    finally:
        engine.release()


@pytest.mark.parametrize("compile_mode", ["none", "layers"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_the_backend_rotating_gives_the_class_forwards_tokens(preset, compile_mode, rotating_sdpa):
    model = _model(preset)
    reference, _ = _tokens(model, "never", compile_mode)
    assert [] == rotating_sdpa

    tokens, seen = _tokens(model, "always", compile_mode)

    assert reference == tokens
    assert [2] == seen  # both layers' modules replaced while the engine ran
    assert rotating_sdpa  # and the backend was given the rotation (prefill and decode steps)
    assert 0 == _fused_modules(model)  # given back at release


def test_mistrals_window_reaches_the_backend(rotating_sdpa):
    """Prompts longer than the tiny Mistral's 64-token window: the replacement forward passes the window on."""
    model = _model("tiny-mistral")
    prompts = [[(11 * i + j) % 300 + 1 for j in range(70 + 9 * i)] for i in range(3)]
    reference, _ = _tokens(model, "never", "none", prompts)
    tokens, _ = _tokens(model, "always", "none", prompts)
    assert reference == tokens
    assert {64} == set(rotating_sdpa)


def test_fused_projections_with_biases_keep_their_logits(rotating_sdpa):
    """Qwen2's q/k/v biases go through the fused product the replacement forward calls."""
    model = _model("tiny-qwen2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    reference, _ = _tokens(model, "never", "none", fuse_projections="always")
    tokens, _ = _tokens(model, "always", "none", fuse_projections="always")
    assert reference == tokens


def test_auto_keeps_the_models_rotary_where_the_backend_does_not_rotate():
    model = _model("tiny", "float32")
    tokens, seen = _tokens(model, "auto", "none")
    assert [0] == seen
    with pytest.raises(UnsupportedError, match=r"engine.fuse_rotary: 'always' cannot fuse here: the attention "
                                               r"backend 'sdpa' does not apply the rotary embedding itself .*"
                                               r"valid here: auto, never"):
        _tokens(model, "always", "none")


def test_auto_is_the_default_and_fuses_where_it_can(rotating_sdpa):
    assert "auto" == EngineConfig().fuse_rotary
    _, seen = _tokens(_model("tiny", "float32"), "auto", "none")
    assert [2] == seen


def test_what_cannot_fuse_says_why(rotating_sdpa):
    model = _model("tiny", "float32")
    assert unsupported_reason(model, Sdpa()) is None
    attn = model.model.layers[1].self_attn
    attn.__class__ = type("GemmaLikeAttention", (type(attn),), {})
    assert ("layer 1's attention is a GemmaLikeAttention, not one of known shape (LlamaAttention, "
            "MistralAttention, Qwen2Attention, Qwen3Attention)") == unsupported_reason(model, Sdpa())
    _, seen = _tokens(model, "auto", "none")
    assert [0] == seen


def test_switching_is_idempotent_and_restores_the_class_forward():
    model = _model("tiny", "float32")
    assert 2 == set_rotary_fused(model, True)
    assert 0 == set_rotary_fused(model, True)
    assert 2 == _fused_modules(model)
    assert 2 == set_rotary_fused(model, False)
    assert 0 == set_rotary_fused(model, False)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


def test_tensor_parallel_layers_keep_their_rotary(rotating_sdpa):
    model = _model("tiny", "float32")
    attn = model.model.layers[0].self_attn
    attn.o_proj = type("RowParallelLinear", (torch.nn.Module,), {})()
    assert "tensor parallelism" in unsupported_reason(model, Sdpa())


def test_qwen2s_per_layer_windows_reach_the_backend(rotating_sdpa):
    """Qwen2 with sliding windows from its second layer on: each layer passes its own window (or none)."""
    model, _ = build_model(ModelConfig(preset="tiny-qwen2", dtype="float64", device="cpu", overrides={
        "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}), get_plugin_host())
    assert ["full_attention", "sliding_attention"] == model.config.layer_types
    prompts = [[(5 * i + j) % 300 + 1 for j in range(30 + 7 * i)] for i in range(3)]
    reference, _ = _tokens(model, "never", "none", prompts)
    tokens, _ = _tokens(model, "always", "none", prompts)
    assert reference == tokens
    assert {None, 16} == set(rotating_sdpa)
