"""The engine on a real GPU: every combination gives the same greedy tokens, graph replay equals eager, and
nothing leaks across consecutive `generate` calls.

The engines pin `decode_gemm` (and so `fold_norms`, which follows it): `auto` runs the card's Triton GEMM and folds
the norms only where steps are captured, and cuBLAS elsewhere, which rounds differently. Pinned, eager and captured
engines run the same kernels, and on a Hopper card the folded layers go through all 27 combinations."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BUFFERS = ["single", "double", {"name": "n_slot", "num_slots": 3}]
STREAMS = ["one", "two", "three"]
GRAPHS = ["eager", "per_slot", "staged", "mixed"]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
KERNEL = "tma" if HOPPER else "torch"


@pytest.fixture(scope="module")
def model():
    m, _ = build_model(ModelConfig(preset="small", dtype="bfloat16", device="cuda"), get_plugin_host())
    return m


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(0)
    prompts = [[rng.randrange(32000) for _ in range(rng.randint(5, 200))] for _ in range(24)]
    params = [SamplingParams(max_new_tokens=rng.randint(8, 40)) for _ in prompts]
    return prompts, params


def _engine(model, buffers="single", streams="one", graphs="eager", compile="none", **extra):
    cfg = EngineConfig.from_dict({"runtime": "cuda", "buffers": buffers, "streams": streams, "graphs": graphs,
                                  "compile": compile, "decode_gemm": KERNEL,
                                  "batch": {"max_tokens": 512, "max_seqs": 16},
                                  "cache": {"num_blocks": 1024, "block_size": 16}, **extra})
    return Engine.from_model(model, cfg)


@pytest.fixture(scope="module")
def reference(model, workload):
    engine = _engine(model)
    return [o.token_ids for o in engine.generate(*workload)]


@pytest.mark.parametrize("buffers,streams,graphs", list(itertools.product(BUFFERS, STREAMS, GRAPHS)),
                         ids=lambda v: v if isinstance(v, str) else "n_slot3")
def test_every_combination_gives_identical_greedy_tokens(model, workload, reference, buffers, streams, graphs):
    """Length-limited greedy workload: each combination equals single/one/eager token for token."""
    engine = _engine(model, buffers, streams, graphs)

    outputs = engine.generate(*workload)

    assert reference == [o.token_ids for o in outputs]
    if graphs != "eager":
        assert any(s.graph_replay for s in engine.last_result.steps)


def test_graph_replay_equals_eager_with_sampling(model, workload):
    """Seeded sampling (temperature, top-k, top-p) through replayed graphs equals the eager run."""
    prompts, _ = workload
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=i)
              for i in range(len(prompts))]
    eager = _engine(model, "double", "three", "eager").generate(prompts, params)
    graphed_engine = _engine(model, "double", "three", "per_slot")
    graphed = graphed_engine.generate(prompts, params)

    assert [o.token_ids for o in eager] == [o.token_ids for o in graphed]
    assert sum(s.graph_replay for s in graphed_engine.last_result.steps) > 10


def test_compiled_layers_give_the_same_tokens_in_every_pipeline(model, workload):
    """With `compile: layers`, the synchronous eager loop and the default asynchronous engine agree."""
    eager = _engine(model, "single", "one", "eager", compile="layers").generate(*workload)
    default = _engine(model, "double", "three", "per_slot", compile="layers").generate(*workload)

    assert [o.token_ids for o in eager] == [o.token_ids for o in default]


def test_nothing_leaks_across_generate_calls(model, workload):
    """Three consecutive generate calls: same tokens, same allocated memory after each, all blocks returned."""
    engine = _engine(model, "double", "three", "per_slot")
    tokens, allocated = [], []
    for _ in range(3):
        tokens.append([o.token_ids for o in engine.generate(*workload)])
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())

    assert tokens[0] == tokens[1] == tokens[2]
    assert allocated[1] == allocated[2]


def test_busy_fraction_is_measured(model, workload):
    """The cuda runtime times every compute op with events, so the busy fraction exists and is sane."""
    engine = _engine(model, "double", "three", "per_slot")
    engine.generate(*workload)

    busy = engine.last_result.summary.compute_busy_fraction
    assert busy is not None and 0.0 < busy <= 1.0
    assert all(s.compute_s is not None and s.compute_s > 0 for s in engine.last_result.steps)


@pytest.mark.parametrize("graphs", ["per_slot", "mixed"])
def test_a_warmed_engine_captures_nothing_during_a_run(model, workload, graphs):
    """Build-time warm-up captured every shape: the run replays in every step (mixed steps included: the triton
    backend's launch depends on padded counts only, and every step here fits `max_capture_tokens`)."""
    engine = _engine(model, "double", "three", graphs, compile="layers")
    built = engine.graphs.captures

    engine.generate(*workload)

    assert built == engine.graphs.captures
    steps = engine.last_result.steps
    assert [True] * len(steps) == [s.graph_replay for s in steps]
    assert any(s.num_tokens > s.num_seqs for s in steps)


def test_mixed_graphs_equal_per_slot_compiled(model, workload):
    """Full-step graphs of mixed steps compute exactly what the default policy computes (same kernels, same
    padding), in bf16 and with compiled layers."""
    per_slot = _engine(model, "double", "three", "per_slot", compile="layers").generate(*workload)
    mixed = _engine(model, "double", "three", "mixed", compile="layers").generate(*workload)

    assert [o.token_ids for o in per_slot] == [o.token_ids for o in mixed]
