"""Fused projections (`engine.fuse_projections`): q/k/v and gate/up as one matrix product give the same logits
(float32 within rounding) and the same tokens (float64) on every supported architecture, compiled or not; they
switch on and off in place without copying weights; a forward that calls the projections in another order is
still right."""

from __future__ import annotations

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.fusion import set_fused
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

PRESETS = ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
PROMPTS = [[(7 * i + j) % 300 + 1 for j in range(3 + 4 * i)] for i in range(5)]


def _model(preset: str, dtype: str = "float64"):
    model, _ = build_model(ModelConfig(preset=preset, dtype=dtype, device="cpu"), get_plugin_host())
    return model


def _members(model) -> list[str]:
    return sorted(m.name for m in model.modules() if type(m).__name__ == "FusedProjection")


def _tokens(model, fuse: str, compile_mode: str = "none") -> list[tuple[int, ...]]:
    cfg = EngineConfig.from_dict({"runtime": "cpu", "fuse_projections": fuse, "compile": compile_mode,
                                  "cache": {"num_blocks": 100, "block_size": 8}})
    engine = Engine.from_model(model, cfg)
    try:
        return [o.token_ids for o in engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))]
    finally:
        fused = engine.fused
        engine.release()  # the model's own attention again (and unfused): plain forwards below
        set_fused(model, fused)


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_projections_give_the_same_logits_and_tokens(preset):
    model = _model(preset)
    reference = _tokens(model, "never")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert reference == _tokens(model, "always")
    assert sorted(["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"] * 2) == _members(model)  # 2 layers
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters())

    ids = torch.tensor([PROMPTS[-1]])
    fused_logits = model(ids).logits
    set_fused(model, False)
    assert [] == _members(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the weights, unchanged
    torch.testing.assert_close(fused_logits, model(ids).logits, rtol=1e-12, atol=1e-12)  # float64


def test_float32_logits_agree_within_rounding(tiny32):
    model = _model("tiny", "float32")
    ids = torch.tensor([list(range(1, 40))])
    plain = model(ids).logits
    set_fused(model, True)

    torch.testing.assert_close(plain, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_unfused_weights_are_views_of_the_fused_ones():
    model = _model("tiny")
    set_fused(model, True)
    attn = model.model.layers[0].self_attn
    fused = attn._fused_q_proj

    assert 0 == set_fused(model, True)  # idempotent
    assert 4 == set_fused(model, False)  # 2 layers x (qkv, gate/up)
    assert [type(attn.q_proj).__name__, attn.q_proj.weight.shape[0]] == ["Linear", model.config.hidden_size]
    assert fused.data_ptr() == attn.q_proj.weight.data_ptr()  # no copy
    assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.weight.shape[0]:].data_ptr()
    assert 0 == set_fused(model, False)


def test_a_forward_that_calls_the_projections_out_of_order_is_still_right():
    model = _model("tiny")
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    expected = [attn.v_proj(x), attn.k_proj(x), attn.q_proj(x), attn.q_proj(x + 1)]
    set_fused(model, True)

    got = [attn.v_proj(x), attn.k_proj(x), attn.q_proj(x), attn.q_proj(x + 1)]

    for e, g in zip(expected, got):
        torch.testing.assert_close(e, g, rtol=1e-12, atol=1e-12)
    assert attn.q_proj.group.kept is not None  # q ran without k and v after it: kept until the next q
    attn.k_proj(x + 2)
    attn.v_proj(x + 2)  # other inputs: computed alone, the kept product is never used for them


def test_auto_fuses_only_where_steps_are_captured_and_release_unfuses():
    model = _model("tiny")
    engine = Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu"}))
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))
    assert (False, []) == (engine.fused, _members(model))

    engine = Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu", "fuse_projections": "always"}))
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2))
    assert 10 == len(_members(model))
    engine.release()
    assert [] == _members(model)


@pytest.mark.slow
def test_compiled_fused_layers_give_the_reference_tokens():
    model = _model("tiny")
    reference = _tokens(model, "never")

    assert reference == _tokens(model, "always", compile_mode="layers")
    set_fused(model, False)
    from asyncbatch.core.compile import set_compiled

    set_compiled(model, False)
