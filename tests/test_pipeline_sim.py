"""The invariants of the design (docs/concepts.md), checked on the `sim` runtime for every combination of strategies.

Hypothesis picks the workload, the combination, the cache geometry and every execution choice of the simulated
device (which ready op runs next, how far the device runs ahead). For each example: the happens-before checker
reports no unordered conflicting access; tokens equal the `single`/`one`/`eager` reference; every request ends;
nothing deadlocks and nothing leaks.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import (
    BUFFERS,
    GRAPHS,
    SCHEDULERS,
    STREAMS,
    DataChooser,
    combinations,
    engine_dict,
    geometries,
    workloads,
)

from asyncbatch import Engine, EngineConfig
from asyncbatch.core.pipeline import PipelineDebug
from asyncbatch.core.runtime.sim import SimRuntime, SimRuntimeConfig


def _run(model, cfg_dict, work, runtime):
    engine = Engine.from_model(model, EngineConfig.from_dict(cfg_dict), runtime=runtime)
    prompts = [p for p, _ in work]
    params = [s for _, s in work]
    return engine, engine.generate(prompts, params)


def _reference(model, work, geometry):
    cfg = engine_dict("single", "one", "eager", "fifo", runtime="cpu", **geometry)
    return [o.token_ids for o in _run(model, cfg, work, None)[1]]


def check_invariants(model, work, combo, geometry, data, debug=PipelineDebug()):
    """The design's properties for one workload, combination, geometry and execution order."""
    runtime = SimRuntime(SimRuntimeConfig(), chooser=DataChooser(data))
    engine = Engine.from_model(model, EngineConfig.from_dict(engine_dict(*combo, **geometry)), runtime=runtime,
                               debug=debug)
    outputs = engine.generate([p for p, _ in work], [s for _, s in work])

    assert [] == [str(c) for c in runtime.conflicts]
    assert _reference(model, work, geometry) == [o.token_ids for o in outputs]
    assert all(o.finish_reason in ("length", "stop") for o in outputs)
    assert 0 == engine.pipeline.rt.conflicts.__len__()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(work=workloads(), combo=combinations, geometry=geometries, data=st.data())
def test_every_combination_is_race_free_and_token_identical(tiny64, work, combo, geometry, data):
    """No unordered conflict, reference tokens, every request ended, under hypothesis-chosen execution orders
    (the engine never relies on a stream ordering its ops: the sim does not, unless asked)."""
    check_invariants(tiny64, work, combo, geometry, data)


@pytest.mark.parametrize("buffers,streams,graphs,scheduler",
                         list(itertools.product(BUFFERS, STREAMS, GRAPHS, SCHEDULERS)),
                         ids=lambda v: v if isinstance(v, str) else f"n{v['num_slots']}")
def test_each_combination_on_a_fixed_workload(tiny64, fixed_workload, fixed_reference, buffers, streams, graphs,
                                              scheduler):
    """All 144 built-in combinations, once each, on a workload with stops, sampling and preemption."""
    runtime = SimRuntime(SimRuntimeConfig(seed=7))
    _, outputs = _run(tiny64, engine_dict(buffers, streams, graphs, scheduler, max_tokens=16, max_seqs=6,
                                          num_blocks=24), fixed_workload, runtime)

    assert [] == [str(c) for c in runtime.conflicts]
    assert fixed_reference == [o.token_ids for o in outputs]


@pytest.mark.parametrize("buffers,streams,graphs,scheduler",
                         list(itertools.product(BUFFERS, STREAMS, GRAPHS, SCHEDULERS)),
                         ids=lambda v: v if isinstance(v, str) else f"n{v['num_slots']}")
def test_each_combination_on_the_cpu_runtime(tiny64, fixed_workload, fixed_reference, buffers, streams, graphs,
                                             scheduler):
    """The same token identity on the `cpu` runtime (program order) for every combination."""
    _, outputs = _run(tiny64, engine_dict(buffers, streams, graphs, scheduler, max_tokens=16, max_seqs=6,
                                          num_blocks=24, runtime="cpu"), fixed_workload, None)

    assert fixed_reference == [o.token_ids for o in outputs]


@pytest.fixture(scope="module")
def fixed_workload():
    return _fixed()


def _fixed():
    import random

    from asyncbatch import SamplingParams

    rng = random.Random(3)
    work = []
    for i in range(10):
        prompt = [rng.randrange(512) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 10), temperature=[0.0, 0.9][i % 2],
                                top_k=[0, 8][i % 3 == 0], stop_token_ids=(rng.randrange(512), 17), seed=i,
                                priority=i % 3)
        work.append((prompt, params))
    return work


@pytest.fixture(scope="module")
def fixed_reference(tiny64, fixed_workload):
    geometry = {"max_tokens": 16, "max_seqs": 6, "num_blocks": 24, "block_size": 4}
    return _reference(tiny64, fixed_workload, geometry)
