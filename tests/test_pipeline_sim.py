"""The invariants of the design (docs/invariants.md), checked on the `sim` runtime for every combination of strategies.

The checks are the public kit's (`asyncbatch.testing.check_engine`): the happens-before checker reports no
unordered conflicting access; every request ends (nothing deadlocks, nothing leaks); finish reasons and lengths obey
`max_new_tokens` and stop ids; tokens equal the `single`/`one`/`eager` reference. Hypothesis picks the workload, the
combination, the cache geometry and every execution choice of the simulated device (which ready op runs next, how
far the device runs ahead). The combinations are every built-in the plugin host registers.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbatch import Engine, EngineConfig
from asyncbatch.testing import (
    FIXED_GEOMETRY,
    Combination,
    check_engine,
    combinations,
    engine_dict,
    every_combination,
    fixed_workload,
    geometries,
    reference_tokens,
    workloads,
)

COMBINATIONS = every_combination()


def _id(combo: Combination) -> str:
    def short(spec):
        return spec if isinstance(spec, str) else f"n{spec['num_slots']}" if spec["name"] == "n_slot" else str(spec)

    return "-".join(short(s) for s in (combo.buffers, combo.streams, combo.graphs, combo.scheduler))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(work=workloads(), combo=combinations(), geometry=geometries, data=st.data())
def test_every_combination_is_race_free_and_token_identical(tiny64, work, combo, geometry, data):
    """No unordered conflict, every request ended within its limits, reference tokens, under hypothesis-chosen
    execution orders (the engine never relies on a stream ordering its ops: the sim does not, unless asked)."""
    check_engine(tiny64, combo.config(**geometry), work, data=data)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_id)
def test_each_combination_on_a_fixed_workload(tiny64, fixed_reference, combo):
    """Every built-in combination, once each, on a workload with stops, sampling and preemption."""
    result = check_engine(tiny64, combo.config(**FIXED_GEOMETRY), fixed_workload(), reference=fixed_reference,
                          seed=7)

    assert fixed_reference == tuple(o.token_ids for o in result.result.outputs)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=_id)
def test_each_combination_on_the_cpu_runtime(tiny64, fixed_reference, combo):
    """The same token identity on the `cpu` runtime (program order) for every combination."""
    work = fixed_workload()
    engine = Engine.from_model(tiny64, EngineConfig.from_dict(combo.config(runtime="cpu", **FIXED_GEOMETRY)))
    outputs = engine.generate([p for p, _ in work], [s for _, s in work])

    assert fixed_reference == tuple(o.token_ids for o in outputs)


@pytest.fixture(scope="module")
def fixed_reference(tiny64):
    return reference_tokens(tiny64, engine_dict("single", "one", "eager", "fifo", **FIXED_GEOMETRY), fixed_workload())
