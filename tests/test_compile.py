"""`compile: layers`: decoder layers under torch.compile give the reference tokens, share one compiled graph
across layers, engines and batch shapes, and can be switched off again on a shared model."""

from __future__ import annotations

import random

import torch._dynamo.utils as dynamo_utils

from asyncbatch import Engine, EngineConfig, SamplingParams


def _run(model, compile_mode, num_blocks=200, max_tokens=64):
    cfg = EngineConfig.from_dict({"runtime": "cpu", "compile": compile_mode, "batch": {"max_tokens": max_tokens,
                                  "max_seqs": 8}, "cache": {"num_blocks": num_blocks, "block_size": 8}})
    engine = Engine.from_model(model, cfg)
    rng = random.Random(1)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(1, 50))] for _ in range(8)]
    return engine, [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=6))]


def test_compiled_layers_match_eager_and_do_not_recompile_per_engine(tiny64):
    """Tokens equal the eager run; later engines with other cache sizes and budgets compile nothing new."""
    _, reference = _run(tiny64, "none")
    _, first = _run(tiny64, "layers")
    graphs_after_first = dynamo_utils.counters["stats"]["unique_graphs"]
    _, second = _run(tiny64, "layers", num_blocks=120, max_tokens=32)

    assert reference == first == second
    assert graphs_after_first == dynamo_utils.counters["stats"]["unique_graphs"]


def test_an_eager_engine_on_a_compiled_model_runs_eagerly(tiny64):
    """The compiled state lives on the shared model: each engine sets it at the start of its run."""
    compiled, _ = _run(tiny64, "layers")
    outer = [tiny64.model.norm, tiny64.model.rotary_emb]  # once a step, around the layers: compiled with them
    assert all(m._compiled_call_impl is not None for m in [*tiny64.model.layers, *outer])

    _run(tiny64, "none")

    assert all(m._compiled_call_impl is None for m in [*tiny64.model.layers, *outer])
