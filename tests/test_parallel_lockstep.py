"""What tensor parallelism relies on: a rank's batches are a function of the requests alone, never of timing.

Tensor-parallel ranks each run their own scheduler and pipeline and meet in the all-reduces inside every step;
they stay in lockstep only if the same requests give the same sequence of batches however fast each rank's host
and device are and in whatever order its ops complete. Here the same workload runs on the `sim` runtime under
two very different timings (hypothesis-style random op order with a fast host; discrete-event order with a host
30x slower than the device), and the plans of every step must be identical, for every pipeline shape and every
built-in scheduler, on a workload with stops, sampling and preemption.
"""

from __future__ import annotations

import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.testing import FIXED_GEOMETRY, every_combination, fixed_workload

SHAPES = every_combination(only={"scheduler": "fifo"})
SCHEDULERS = [c for c in every_combination(only={"buffers": "double", "streams": "three", "graphs": "mixed"})
              if c.scheduler != "fifo"]
TIMINGS = {
    "random-order": {"name": "sim", "order": "random", "seed": 1},
    "slow-host": {"name": "sim", "order": "timed", "cost": {"cpu_prep_ms": 30.0, "cpu_update_ms": 20.0,
                                                             "gpu_compute_ms": 1.0}},
}


def _plan(model, combo, runtime, arrivals=None) -> list[tuple]:
    cfg = {**combo.config(**FIXED_GEOMETRY), "runtime": runtime}
    engine = Engine.from_model(model, EngineConfig.from_dict(cfg))
    work = fixed_workload()
    result = engine.run(engine.make_requests([p for p, _ in work], [s for _, s in work], arrival_times=arrivals))
    return [(s.num_seqs, s.num_tokens, s.num_decode, s.num_context, s.padded_tokens) for s in result.steps]


@pytest.mark.parametrize("combo", SHAPES + SCHEDULERS, ids=str)
def test_the_batches_do_not_depend_on_timing(tiny64, combo):
    plans = [_plan(tiny64, combo, runtime) for runtime in TIMINGS.values()]

    assert plans[0] == plans[1]
    assert len(plans[0]) > 3


def test_arrivals_in_time_would_split_the_ranks(tiny64):
    """The control, and why tensor parallelism refuses online arrivals: admitted by each rank's own clock, the
    same requests enter at different steps, and the ranks' batches (so their all-reduces) would differ."""
    combo = SHAPES[0]
    arrivals = [0.05 * i for i in range(len(fixed_workload()))]
    plans = [_plan(tiny64, combo, runtime, arrivals) for runtime in TIMINGS.values()]

    assert plans[0] != plans[1]
