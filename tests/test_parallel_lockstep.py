"""What tensor parallelism relies on: a rank's batches are a function of the requests alone, never of timing.

Tensor-parallel ranks each run their own scheduler and pipeline and meet in the all-reduces inside every step;
they stay in lockstep only if the same requests give the same sequence of batches however fast each rank's host
and device are and in whatever order its ops complete. Here the same workload runs on the `sim` runtime under
two very different timings (hypothesis-style random op order with a fast host; discrete-event order with a host
30x slower than the device), and the plans of every step must be identical, for every pipeline shape and every
built-in scheduler, on a workload with stops, sampling and preemption.
"""

from __future__ import annotations

import copy
import time

import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.testing import FIXED_GEOMETRY, RanksSplitError, every_combination, fixed_workload, run_ranks

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


# ---- ranks that meet: the `sim` runtime with a `SimGroup`, one thread per rank

def _rank_engines(model, combo, runtimes: list[dict]) -> list[Engine]:
    return [Engine.from_model(copy.deepcopy(model), EngineConfig.from_dict(
        {**combo.config(**FIXED_GEOMETRY), "runtime": runtime})) for runtime in runtimes]


def _run(arrivals=None):
    work = fixed_workload()

    def run(engine):
        requests = engine.make_requests([p for p, _ in work], [s for _, s in work], arrival_times=arrivals)
        return engine.run(requests)

    return run


@pytest.mark.parametrize("combo", SHAPES, ids=str)
def test_ranks_that_meet_in_every_step_stay_in_lockstep(tiny64, combo):
    """Two ranks with opposite timings, coupled at every compute op as the all-reduces couple them on cards: no
    race on either rank, no deadlock between their host waits, the same plan at every meeting, the same tokens."""
    engines = _rank_engines(tiny64, combo, list(TIMINGS.values()))
    results = run_ranks(engines, _run(), timeout_s=30)

    tokens = [[o.token_ids for o in r.outputs] for r in results]
    alone = Engine.from_model(tiny64, EngineConfig.from_dict({**combo.config(**FIXED_GEOMETRY), "runtime": "cpu"}))
    assert [[o.token_ids for o in _run()(alone).outputs]] * 2 == tokens
    assert [[], []] == [e.runtime.conflicts for e in engines]
    assert len(results[0].steps) == len(results[1].steps) > 3


def test_ranks_that_admit_by_their_own_clock_split_and_the_group_names_the_collective(tiny64):
    """The live form of the control above: with arrivals in time, the ranks bring different plans to a meeting,
    and the run fails there, naming it and both ranks' steps, instead of summing different batches."""
    engines = _rank_engines(tiny64, SHAPES[0], list(TIMINGS.values()))
    arrivals = [0.05 * i for i in range(len(fixed_workload()))]

    with pytest.raises(RanksSplitError, match=r"the ranks split at collective \d+: rank 0 brought .*; rank 1 brought"):
        run_ranks(engines, _run(arrivals), timeout_s=30)


def test_a_slow_host_on_one_rank_stalls_every_ranks_device(tiny64):
    """Virtual time with ranks: each step starts on every rank when the slowest rank reaches it, so one rank's
    slow host (30 ms to prepare, against 10 ms of compute) idles the other rank's device just as much."""
    combo = next(c for c in SHAPES if (c.buffers, c.streams, c.graphs) == ("double", "three", "mixed"))
    fast = {"name": "sim", "order": "timed", "cost": {"cpu_prep_ms": 1.0, "gpu_compute_ms": 10.0}}
    slow = {"name": "sim", "order": "timed", "cost": {"cpu_prep_ms": 30.0, "gpu_compute_ms": 10.0}}
    fast_alone, slow_alone = (_run()(_rank_engines(tiny64, combo, [t])[0]).summary.compute_busy_fraction
                              for t in (fast, slow))
    engines = _rank_engines(tiny64, combo, [fast, slow])
    results = run_ranks(engines, _run(), timeout_s=30)

    busy = [r.summary.compute_busy_fraction for r in results]
    starts = [[s.start for s in e.runtime.spans if s.name == "comp"] for e in engines]
    assert fast_alone > 0.99 and slow_alone < 0.5
    assert [slow_alone] * 2 == pytest.approx(busy)
    assert starts[0] == starts[1]


def test_a_rank_that_fails_stops_the_others_without_a_hang(tiny64):
    engines = _rank_engines(tiny64, SHAPES[0], [TIMINGS["random-order"]] * 2)

    def run(engine):
        if engine is engines[1]:
            raise ValueError("rank 1 broke before its first step")
        return _run()(engine)

    started = time.perf_counter()
    with pytest.raises(ValueError, match="rank 1 broke"):
        run_ranks(engines, run, timeout_s=30)
    assert time.perf_counter() - started < 10  # rank 0 stopped waiting when rank 1 failed, not at the timeout
