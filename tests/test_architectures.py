"""Decoder-only architectures beyond the four of `test_hf_equivalence`: the engine's greedy tokens equal
transformers' own forward (float64, CPU, prompts of 1..97 tokens sharing steps, prefill chunked by a small token
budget, with q/k/v and gate/up fused or not), and those it cannot compute exactly are refused with the reason (`model_support`)."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as t
from hf_reference import hf_greedy
from transformers import AutoModelForCausalLM

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.errors import UnsupportedError

COMMON = dict(vocab_size=512, max_position_embeddings=1024, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
LLAMA_LIKE = dict(COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
GPT_LIKE = dict(COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=1024)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# model_type -> config fields (besides the sizes), for every architecture checked token for token
RUNS = {
    "gemma": {},
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "granite": dict(embedding_multiplier=2.0, attention_multiplier=0.1, residual_multiplier=0.5,
                    logits_scaling=4.0),
    "cohere": {},
    "stablelm": dict(partial_rotary_factor=0.25),
    "starcoder2": dict(sliding_window=16),
    "gpt_neox": dict(rotary_pct=0.5),
    "smollm3": {},
    "helium": {},
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2),  # keys tiled to all heads
    "gpt2": {},
    "gpt_bigcode": dict(multi_query=True),
    "bert": dict(is_decoder=True),  # an encoder family configured as a causal decoder
}
GPT_STYLE = {"gpt2", "gpt_bigcode"}
NO_KV_HEADS = {"bert", "gpt_neox"}  # no GQA: the field would be stored, unused
NEW_TOKENS = 6


def _config(model_type: str, **fields):
    if model_type in GPT_STYLE:
        sizes = dict(GPT_LIKE)
    else:
        sizes = dict(LLAMA_LIKE)
        if model_type in NO_KV_HEADS:
            sizes.pop("num_key_value_heads"), sizes.pop("head_dim")
    return t.CONFIG_MAPPING[model_type](**{**sizes, **fields})


def _model(config):
    torch.manual_seed(0)
    # the experts' eager loop: transformers' grouped GEMM takes no float64
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64, experts_implementation="eager").eval()


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 2, 17, 33, 70, 97)]


@pytest.mark.parametrize("fuse", ["never", "always"])  # a GPU engine fuses q/k/v and gate/up by default
@pytest.mark.parametrize("model_type", list(RUNS))
def test_greedy_tokens_equal_transformers_forward(model_type, fuse):
    model = _model(_config(model_type, **RUNS[model_type]))
    prompts = _prompts()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    engine = Engine.from_model(model, EngineConfig.from_dict({
        "runtime": "cpu", "fuse_projections": fuse, "batch": {"max_tokens": 16, "max_seqs": 8},
        "cache": {"num_blocks": 96, "block_size": 8}}))

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))

    assert expected == [o.token_ids for o in outputs]


@pytest.mark.parametrize("model_type, fields, reason", [
    ("bert", {}, "BertLMHeadModel's attention is bidirectional (bert.encoder.layer.0.attention.self.is_causal is "
                 "false: an encoder, or a config without is_decoder: true), which the engine's causal attention "
                 "does not compute"),
    ("roberta", {}, "RobertaForCausalLM's attention is bidirectional (roberta.encoder.layer.0.attention.self."
                    "is_causal is false"),
    ("diffllama", {}, "DiffLlama uses differential attention (lambda_std_dev): two attention calls per layer over "
                      "halves of the values, which the one paged KV cache of a layer does not hold"),
    ("dory", dict(sliding_window=8, num_hidden_layers=3, n_input_layers=1, n_output_layers=1, n_recurrent_layers=1),
     "Dory runs its recurrent layers several times per token (n_recurrent_loops), each loop with a KV cache of its "
     "own, which the one paged KV cache of a layer does not hold"),
])
def test_an_architecture_it_would_compute_wrongly_is_refused_with_the_reason(model_type, fields, reason):
    fields = dict(fields)
    if model_type in ("bert", "roberta"):
        config = t.CONFIG_MAPPING[model_type](**{k: v for k, v in LLAMA_LIKE.items()
                                                 if k not in ("num_key_value_heads", "head_dim")}, **fields)
    else:
        config = _config(model_type, **fields)
    model = _model(config)

    with pytest.raises(UnsupportedError) as error:
        Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu"}))

    assert reason in str(error.value)
