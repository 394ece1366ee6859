"""The test of the tests: remove any one edge of the design's event table and the invariant checks fail, for
that edge's reason (a conflict on the resource the edge protects, naming the two ops).

Under the design loop (`prep[k]; launch[k]; upd[k-S+1]`) the four slot-reuse edges are also implied by the host's
wait before `upd[k-S]` (d2h[k-S] follows comp[k-S] follows h2d[k-S]). They are load-bearing in the `split_launch`
loop shape, where the host enqueues d2h[k] only after reading slot s, so nothing else orders them; that is where
their removal is checked.
"""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.pipeline import EDGES, PipelineDebug
from asyncbatch.core.runtime.sim import SimRuntime, SimRuntimeConfig
from asyncbatch.testing import InvariantError, check_engine, combinations, engine_dict, geometries, workloads

RNG = random.Random(5)
MIXED = [([RNG.randrange(512) for _ in range(RNG.randint(1, 24))], SamplingParams(max_new_tokens=RNG.randint(2, 8)))
         for _ in range(10)]
# Single-token requests: consecutive batches share no request, so only the edge under test orders them.
ONE_SHOT = [([RNG.randrange(512) for _ in range(4)], SamplingParams(max_new_tokens=1)) for _ in range(16)]
# The same, sharing a 12-token prefix. With a 13-token budget the first batch holds the first request alone (no
# chunk of another rides along) and the second batch the seven others, on fresh rows, each reading the three
# blocks the first batch computed: only the `cached` edge orders the two batches.
PREFIX = [RNG.randrange(512) for _ in range(12)]
SHARED_ONE_SHOT = [(PREFIX + [RNG.randrange(512)], SamplingParams(max_new_tokens=1)) for _ in range(8)]

# edge -> (engine settings, workload, loop shape, resource the conflict must be on)
CASES = {
    "h2d->comp": (dict(graphs="eager"), MIXED, False, "dev_in"),
    "comp->d2h": (dict(graphs="eager"), MIXED, False, "dev_out"),
    "d2h->upd": (dict(graphs="eager"), MIXED, False, "host_out"),
    "comp->comp": (dict(graphs="eager", max_tokens=16, max_seqs=4), MIXED, False, "kv"),
    "h2d->prep": (dict(graphs="eager"), MIXED, True, "host_in"),
    "comp->h2d": (dict(graphs="eager"), MIXED, True, "dev_in"),
    "d2h->comp": (dict(graphs="eager"), MIXED, True, "dev_out"),
    "upd->d2h": (dict(graphs="eager"), MIXED, True, "host_out"),
    "reuse": (dict(graphs="eager", max_tokens=16, max_seqs=2, num_blocks=12), ONE_SHOT, False, "row"),
    "pool": (dict(graphs="per_slot", max_tokens=16, max_seqs=16, num_blocks=400), ONE_SHOT, False, "graph_pool"),
    "cached": (dict(graphs="eager", max_tokens=13, max_seqs=8, prefix_cache="blocks"), SHARED_ONE_SHOT, False,
               "kv"),
}


def _conflicts(model, settings, work, split, disabled, seed):
    settings = dict(settings)
    graphs = settings.pop("graphs")
    prefix_cache = settings.pop("prefix_cache", "none")
    cfg = engine_dict("double", "three", graphs, "fifo", **{"max_tokens": 32, "max_seqs": 8, "num_blocks": 48,
                                                             **settings})
    cfg["prefix_cache"] = prefix_cache
    runtime = SimRuntime(SimRuntimeConfig(seed=seed))
    engine = Engine.from_model(model, EngineConfig.from_dict(cfg), runtime=runtime,
                               debug=PipelineDebug(disabled_edges=frozenset(disabled), split_launch=split))
    try:
        engine.generate([p for p, _ in work], [s for _, s in work])
    except Exception:  # garbage inputs from a race can fail the step; the checker has already spoken
        pass
    return runtime.conflicts


def test_every_edge_of_the_table_has_a_case():
    """The cases cover exactly the edges the pipeline declares."""
    assert sorted(EDGES) == sorted(CASES)


@pytest.mark.parametrize("edge", list(CASES))
def test_removing_an_edge_is_detected_for_the_right_reason(tiny64, edge):
    """With all edges: no conflict. Without `edge`: a conflict on the resource that edge protects."""
    settings, work, split, resource = CASES[edge]

    assert [] == _conflicts(tiny64, settings, work, split, (), seed=0)
    found = _conflicts(tiny64, settings, work, split, (edge,), seed=0)

    assert resource in {c.resource[0] for c in found}, [str(c) for c in found[:5]]


def test_the_pool_edge_guards_mixed_step_graphs(tiny64):
    """Under `graphs: mixed` the steps holding prefill chunks replay graphs from the shared pool too: without the
    `pool` edge, two of them (prefill-only steps of single-token requests, which share no request) conflict."""
    settings = dict(graphs="mixed", max_tokens=16, max_seqs=16, num_blocks=400)

    assert [] == _conflicts(tiny64, settings, ONE_SHOT, False, (), seed=0)
    found = _conflicts(tiny64, settings, ONE_SHOT, False, ("pool",), seed=0)

    assert "graph_pool" in {c.resource[0] for c in found}, [str(c) for c in found[:5]]


@pytest.mark.parametrize("edge", ["h2d->prep", "comp->h2d", "d2h->comp", "upd->d2h"])
def test_slot_edges_are_implied_in_the_design_loop(tiny64, edge):
    """In the design loop the host's wait before upd[k-S] already orders slot reuse: removing one of these
    edges alone is harmless there (they are still enforced, as the design asks)."""
    settings, work, _, _ = CASES[edge]

    assert [] == _conflicts(tiny64, settings, work, False, (edge,), seed=0)


@pytest.mark.parametrize("edge", ["h2d->comp", "comp->d2h", "d2h->upd", "comp->comp"])
def test_the_hypothesis_suite_itself_fails_without_an_edge(tiny64, edge):
    """Run the property suite of test_pipeline_sim (the kit's `check_engine`) with one edge removed: hypothesis
    finds a violation of an invariant.

    (`reuse` and `pool` matter only when consecutive batches share no request; random workloads rarely build
    that, so the targeted cases above are where those two are shown to be load-bearing.)"""

    @settings(max_examples=100, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(work=workloads(min_requests=3), combo=combinations(), geometry=geometries, data=st.data())
    def suite(work, combo, geometry, data):
        if combo.buffers == "single":
            combo = attrs.evolve(combo, buffers="double")  # a synchronous loop orders everything through the host
        check_engine(tiny64, combo.config(**geometry), work, data=data,
                     debug=PipelineDebug(disabled_edges=frozenset([edge])))

    with pytest.raises(InvariantError):  # a race, or the step failing on the garbage inputs a race produced
        suite()
