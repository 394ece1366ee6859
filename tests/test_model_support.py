"""Models the engine cannot compute exactly are refused with the reason before anything runs (checkpoints before
their weights are read); the architectures that need a little more than the common layout run as transformers
does: a decoder layer that drops the forward kwargs (StableLM), LongRoPE within its original context whatever
shares the batch (Phi-3 long-context), a multimodal checkpoint's language model compiled (Gemma 3)."""

from __future__ import annotations

import pytest
import torch
import transformers as t
from hf_reference import hf_greedy
from transformers import AutoModelForCausalLM

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core import model_support
from asyncbatch.core.errors import UnsupportedError

SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)


def _model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _cpu_engine(model, **extra):
    return Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu", "cache": {"num_blocks": 64,
                                                                                        "block_size": 8}, **extra}))


@pytest.mark.parametrize("config, reason", [
    (t.Gemma2Config(**SIZES, head_dim=16), "Gemma2 soft-caps its attention logits (attn_logit_softcapping)"),
    (t.Qwen3NextConfig(**SIZES, head_dim=16, layer_types=["linear_attention", "full_attention"]),
     "Qwen3Next has linear_attention layers besides attention; the engine keeps only a KV cache between steps"),
    (t.Lfm2Config(**SIZES, layer_types=["conv", "full_attention"]), "Lfm2 has conv layers besides attention"),
    (t.DeepseekV3Config(**SIZES, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=16), "DeepseekV3 uses multi-head latent attention (kv_lora_rank)"),
    (t.MambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2),
     "Mamba has no attention heads (num_attention_heads): not an attention model"),
])
def test_a_model_the_engine_would_compute_wrongly_is_refused_from_its_config(config, reason):
    assert reason in model_support.config_unsupported(config)


@pytest.mark.parametrize("config", [
    t.LlamaConfig(**SIZES), t.Gemma2Config(**SIZES, head_dim=16, attn_logit_softcapping=None),
    t.Gemma3TextConfig(**SIZES, head_dim=16, sliding_window=8), t.Qwen2Config(**SIZES, use_sliding_window=True),
])
def test_the_families_it_runs_pass(config):
    assert model_support.config_unsupported(config) is None


def test_attention_sinks_are_refused_when_the_model_is_prepared():
    model = _model(t.GptOssConfig(**SIZES, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                  sliding_window=8, layer_types=["sliding_attention", "full_attention"]))

    with pytest.raises(UnsupportedError, match=r"GptOssForCausalLM has attention sinks \(model.layers.0.self_attn"):
        _cpu_engine(model)


def test_a_checkpoint_is_refused_before_its_weights_are_read(tmp_path, monkeypatch):
    _model(t.Gemma2Config(**SIZES, head_dim=16)).save_pretrained(tmp_path / "g2")
    from asyncbatch.core import checkpoints

    monkeypatch.setattr(checkpoints, "load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(UnsupportedError, match="g2: Gemma2 soft-caps its attention logits"):
        Engine.from_config(EngineConfig.from_dict({"runtime": "cpu", "model": {"path": str(tmp_path / "g2")}}))


def test_a_layer_that_drops_the_forward_kwargs_still_finds_the_step():
    """StableLM's decoder layer calls its attention without the kwargs that carry the step's context."""
    model = _model(t.StableLmConfig(**SIZES, partial_rotary_factor=0.25))
    prompts = [[5, 6, 7, 8, 9], list(range(40, 75))]
    expected = [hf_greedy(model, p, 8) for p in prompts]

    outputs = _cpu_engine(model).generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))

    assert expected == [o.token_ids for o in outputs]


def test_longrope_runs_within_its_original_context_whatever_shares_the_batch():
    """LongRoPE picks short or long rotary frequencies from the longest position of the packed step: past the
    original context a request's tokens would depend on its neighbours, so sequences stop there."""
    hd = 16
    model = _model(t.Phi3Config(**{**SIZES, "max_position_embeddings": 1024}, original_max_position_embeddings=32,
                                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "short_factor": [1.0] * (hd // 2), "long_factor": [8.0] * (hd // 2),
                                                 "original_max_position_embeddings": 32}))
    short, long = [5, 6, 7, 8, 9], list(range(100, 140))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = _cpu_engine(model)

    alone = engine.generate([short], params)[0]
    beside = engine.generate([short, long], params)

    assert 32 == engine.max_len
    assert hf_greedy(model, short, 8) == alone.token_ids == beside[0].token_ids
    assert "error" == beside[1].finish_reason and "model context 32" in beside[1].error


def _dynamic_llama():
    return _model(t.LlamaConfig(**{**SIZES, "max_position_embeddings": 32},
                                rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}))


def test_dynamic_ntk_rope_runs_up_to_max_position_embeddings_and_says_why(caplog):
    """Up to `max_position_embeddings` dynamic NTK RoPE is the plain RoPE: transformers' tokens, whatever shares the
    batch. Sequences stop there, the run says why, and a prompt that does not fit fails that request alone."""
    model = _dynamic_llama()
    short, long = [5, 6, 7, 8, 9], list(range(100, 140))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    with caplog.at_level("INFO", logger="asyncbatch"):
        engine = _cpu_engine(model)

    alone = engine.generate([short], params)[0]
    beside = engine.generate([short, long, list(range(200, 220))], [params, params, SamplingParams(
        max_new_tokens=30, ignore_eos=True)])

    why = ("max_position_embeddings: dynamic NTK RoPE (factor 4.0) is not extended past it, where its frequencies "
           "would depend on what shares the batch")
    assert 32 == engine.max_len
    assert f"sequences are limited to 32 tokens ({why})" in caplog.messages
    assert hf_greedy(model, short, 8) == alone.token_ids == beside[0].token_ids
    assert ("error", f"prompt of 40 tokens leaves no room to generate: at most 31 prompt tokens fit (model context "
                     f"32 from {why}; KV cache 504 tokens)") == (beside[1].finish_reason, beside[1].error)
    assert ("length", 12) == (beside[2].finish_reason, len(beside[2].token_ids))


def test_past_max_position_embeddings_transformers_gives_dynamic_ntk_no_per_sequence_result():
    """Why the cap: past it, transformers' own logits for a position depend on later tokens of the same forward
    call. Should this ever fail, dynamic NTK may have become computable per sequence: revisit `context_limit`."""
    model, seq = _dynamic_llama(), torch.tensor([list(range(10, 60))])
    with torch.no_grad():
        prefix_alone = model(seq[:, :40]).logits[0, 39]
        inside_longer = model(seq).logits[0, 39]

    assert not torch.equal(prefix_alone, inside_longer)


def test_a_multimodal_checkpoints_language_model_is_compiled():
    config = t.Gemma3Config(text_config=dict(**SIZES, head_dim=16, sliding_window=8),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14),
                            mm_tokens_per_image=4, image_token_index=500, boi_token_index=498, eoi_token_index=499)
    model = _model(config)
    prompts = [[5, 6, 7, 8, 9], list(range(40, 60))]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    eager = [o.token_ids for o in _cpu_engine(model).generate(prompts, params)]

    compiled = _cpu_engine(model, compile="layers")
    tokens = [o.token_ids for o in compiled.generate(prompts, params)]

    assert compiled.model_state.compiled
    assert eager == tokens == [hf_greedy(model, p, 6) for p in prompts]
