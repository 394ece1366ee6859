"""A stream consumer that stops after its run ended leaves no cancel behind for a later run's request of the
same id (the cancels it sends on stopping were meant for its own run only)."""

from __future__ import annotations

import time

from asyncbatch import Engine, EngineConfig, SamplingParams


def test_a_stream_closed_after_its_run_does_not_cancel_a_later_request_of_the_same_id(tiny64):
    engine = Engine.from_model(tiny64, EngineConfig())
    params = SamplingParams(max_new_tokens=3)
    events = engine.stream([[1, 2, 3]], params, request_ids=["a"])
    next(events)
    deadline = time.monotonic() + 60
    while engine._lock.locked() and time.monotonic() < deadline:  # the run finishes without a reader
        time.sleep(0.01)
    events.close()  # the consumer stops early, after its run has ended

    out = engine.generate([[1, 2, 3]], params, request_ids=["a"])
    assert [("length", 3)] == [(o.finish_reason, len(o.token_ids)) for o in out]


def test_a_stream_stopped_mid_run_still_cancels_its_requests(tiny64):
    engine = Engine.from_model(tiny64, EngineConfig())
    events = engine.stream([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=500), request_ids=["x", "y"])
    next(events)
    events.close()

    assert {"cancelled"} == {o.finish_reason for o in engine.last_result.outputs}
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), request_ids=["x"])
    assert ["length"] == [o.finish_reason for o in out]
