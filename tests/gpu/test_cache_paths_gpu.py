"""What a full or shared KV cache does to tokens on a GPU, with the default pipeline (double buffers, three
streams, mixed graphs, compiled layers): in batch-invariant mode a request's bf16 tokens are the same whether it was
preempted and recomputed, found its prompt's blocks in the prefix cache, or ran in the synchronous eager loop;
seeded sampling repeats itself. (Without the invariant mode bf16 tokens may change with the batch: on an H200, 23
of 48 requests kept every token under preemption, 36 of 48 with the prefix cache; that is what the mode is for.)"""

from __future__ import annotations

import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOMY, TIGHT = 4096, 200  # 200 blocks of 16 hold 3,200 tokens: 32 running sequences of up to ~1,000 preempt


@pytest.fixture(scope="module")
def model():
    m, _ = build_model(ModelConfig(preset="small", dtype="bfloat16", device="cuda"), get_plugin_host())
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    shared = [rng.randrange(32000) for _ in range(300)]
    own = [[rng.randrange(32000) for _ in range(rng.randint(5, 900))] for _ in range(40)]
    return own + [shared + [rng.randrange(32000) for _ in range(rng.randint(1, 40))] for _ in range(8)]


def _run(model, prompts, params, blocks=ROOMY, **engine):
    cfg = {"runtime": "cuda", "buffers": "double", "streams": "three", "graphs": "mixed", "attention": "auto",
           "cache": {"block_size": 16, "num_blocks": blocks}, "batch": {"max_tokens": 512, "max_seqs": 32},
           **engine}
    e = Engine.from_model(model, EngineConfig.from_dict(cfg))
    try:
        outs = e.generate(prompts, params)
    finally:
        e.release()
    return ([list(o.token_ids) for o in outs], sum(o.num_preemptions for o in outs),
            sum(o.num_cached_tokens for o in outs))


@pytest.fixture(scope="module")
def invariant_reference(model, prompts):
    tokens, preempted, cached = _run(model, prompts, SamplingParams(max_new_tokens=64, ignore_eos=True),
                                     batch_invariant=True)
    assert (0, 0) == (preempted, cached)
    return tokens


@pytest.mark.parametrize("case", ["preempted", "prefix cache", "synchronous eager"])
def test_invariant_tokens_survive_preemption_and_the_prefix_cache(model, prompts, invariant_reference, case):
    engine = {"preempted": {"blocks": TIGHT}, "prefix cache": {"prefix_cache": "blocks"},
              "synchronous eager": {"buffers": "single", "streams": "one", "graphs": "eager"}}[case]

    tokens, preempted, cached = _run(model, prompts, SamplingParams(max_new_tokens=64, ignore_eos=True),
                                     batch_invariant=True, **engine)

    assert invariant_reference == tokens
    assert (preempted > 0) == (case == "preempted")
    assert (cached > 0) == (case == "prefix cache")


def test_seeded_sampling_repeats_itself_under_the_default_pipeline(model, prompts):
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, temperature=0.8, top_p=0.9, seed=11)

    first, _, _ = _run(model, prompts, params)
    second, _, _ = _run(model, prompts, params)

    assert first == second
