"""Greedy outputs equal `model.generate()` of transformers, token for token, on four architectures; also with
chunked prefill forced (a small token budget) and with preemption forced (a cache too small for all)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GenerationConfig

from asyncbatch import Engine, EngineConfig, SamplingParams

ARCHITECTURES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
NEW_TOKENS = 10


def _prompts(n: int = 18, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 5, 17, 33, 64, 70, 97] + [rng.randint(1, 100) for _ in range(n - 8)]
    return [[rng.randrange(512) for _ in range(length)] for length in lengths]


def _hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[tuple[int, ...]]:
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           eos_token_id=None, pad_token_id=0)
    try:
        out = []
        with torch.no_grad():
            for p in prompts:
                # An explicit mask: otherwise generate() masks out prompt tokens equal to pad_token_id.
                x = torch.tensor([p])
                ids = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
                out.append(tuple(ids[0, len(p):].tolist()))
        return out
    finally:
        model.set_attn_implementation(previous)


@pytest.fixture(scope="module")
def references(model_factory):
    prompts = _prompts()
    return prompts, {arch: _hf_greedy(model_factory(arch), prompts, NEW_TOKENS) for arch in ARCHITECTURES}


SETTINGS = {
    "default": {},
    "chunked": {"batch": {"max_tokens": 16, "max_seqs": 8}},
    "preempting": {"batch": {"max_tokens": 64, "max_seqs": 16}, "cache": {"num_blocks": 24, "block_size": 8}},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers_generate(model_factory, references, arch, setting):
    """Every request's greedy tokens equal transformers' own generate() for the same prompt."""
    prompts, refs = references
    cfg = EngineConfig.from_dict({"runtime": "cpu", **SETTINGS[setting]})
    engine = Engine.from_model(model_factory(arch), cfg)

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))

    assert refs[arch] == [o.token_ids for o in outputs]
    assert ["length"] * len(prompts) == [o.finish_reason for o in outputs]
    summary = engine.last_result.summary
    if setting == "preempting":
        assert summary.preemptions > 0
    if setting == "chunked":
        assert max(s.num_tokens for s in engine.last_result.steps) <= 16


def test_async_sim_pipeline_matches_transformers(model_factory, references):
    """The default asynchronous combination on the sim runtime (reordered execution) gives the same tokens."""
    prompts, refs = references
    cfg = EngineConfig.from_dict({"runtime": "sim", "batch": {"max_tokens": 32, "max_seqs": 8},
                                  "cache": {"num_blocks": 40, "block_size": 8}})
    engine = Engine.from_model(model_factory("tiny-llama"), cfg)

    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))

    assert refs["tiny-llama"] == [o.token_ids for o in outputs]
    assert [] == engine.runtime.conflicts
