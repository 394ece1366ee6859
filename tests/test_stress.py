"""Stress: random mixes of good and bad requests, cancels from another thread at random moments, arrival times
with zeros and duplicates, under every buffer policy on the `sim` runtime with the race checker on.

Every example asserts: the call returns (no input raises for the batch or hangs the loop), every bad request ends
`error` with a message, every good request that was not cancelled has the tokens it has in a run of the good
requests alone, a cancelled one ends `cancelled` with a prefix of those tokens (or finished first), no unordered
conflicting access, and every KV block and row is back (the run checks it). CI runs a bounded number of examples;
`ASYNCBATCH_STRESS_EXAMPLES=10000 pytest tests/test_stress.py` is the long run.
"""

from __future__ import annotations

import math
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.runtime.sim import SimRuntime, SimRuntimeConfig
from asyncbatch.testing import BUFFERS, VOCAB, DataChooser, engine_dict

EXAMPLES = int(os.environ.get("ASYNCBATCH_STRESS_EXAMPLES", "25"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(600, EXAMPLES * 2))]

# Values that no step table can hold or no request may carry: each must fail its request only.
BAD_PARAMS = [
    dict(temperature=1e39), dict(temperature=1e-40), dict(temperature=math.nan), dict(top_k=2**31),
    dict(top_p=0.0), dict(priority=None), dict(priority="high"), dict(max_new_tokens=0), dict(max_new_tokens=-3),
    dict(stop_token_ids=(-1,)), dict(seed=-5), dict(ignore_eos="yes"),
]
BAD_PROMPTS = [[], [VOCAB], [1, -2, 3]]
BAD_ARRIVALS = [math.nan, math.inf, -1.0]


@st.composite
def requests(draw):
    """(prompt, params, arrival, kind) with kind 'good', 'bad' (and why) — at least one good request."""
    out = []
    for i in range(draw(st.integers(1, 8))):
        prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24))
        params = dict(max_new_tokens=draw(st.integers(1, 10)), temperature=draw(st.sampled_from([0.0, 0.8])),
                      ignore_eos=True, priority=draw(st.integers(0, 2)))
        arrival = draw(st.sampled_from([0.0, 0.0, 0.01, 0.01, 0.02, 0.05]))
        kind = "good" if i == 0 else draw(st.sampled_from(["good", "good", "params", "prompt", "arrival"]))
        if kind == "params":
            params.update(draw(st.sampled_from(BAD_PARAMS)))
        elif kind == "prompt":
            prompt = draw(st.sampled_from(BAD_PROMPTS))
        elif kind == "arrival":
            arrival = draw(st.sampled_from(BAD_ARRIVALS))
        out.append((prompt, SamplingParams(**params), arrival, kind))
    return out


def _engine(model, buffers, runtime=None, name="sim"):
    cfg = engine_dict(buffers, "three", "per_slot", "priority", max_tokens=16, max_seqs=4, num_blocks=40,
                      block_size=4, runtime=name)
    return Engine.from_model(model, EngineConfig.from_dict(cfg), runtime=runtime)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(work=requests(), buffers=st.sampled_from(BUFFERS), cancels=st.lists(st.integers(0, 7), max_size=3),
       moment=st.integers(0, 12), data=st.data())
def test_stress(tiny64, work, buffers, cancels, moment, data):
    ids = [f"r{i}" for i in range(len(work))]
    good = [i for i, w in enumerate(work) if w[3] == "good"]
    reference = _engine(tiny64, "single", name="cpu").generate([work[i][0] for i in good], [work[i][1] for i in good],
                                                       request_ids=[ids[i] for i in good])
    expected = {ids[i]: o.token_ids for i, o in zip(good, reference, strict=True)}

    runtime = SimRuntime(SimRuntimeConfig(), chooser=DataChooser(data))
    engine = _engine(tiny64, buffers, runtime)
    reqs = engine.make_requests([w[0] for w in work], [w[1] for w in work], request_ids=ids,
                                arrival_times=[w[2] for w in work])
    # Cancels come from another thread once `moment` tokens were delivered (or when the run ends). The engine's
    # thread waits for them at that moment, so hypothesis sees the same execution for the same example.
    to_cancel = sorted({ids[i] for i in cancels if i < len(ids)})
    seen, go, sent = [0], threading.Event(), threading.Event()

    def on_token(ev):
        seen[0] += 1
        if seen[0] == moment:
            go.set()
            sent.wait(timeout=30)

    def canceller():
        go.wait(timeout=30)
        for rid in to_cancel:
            engine.cancel(rid)
        sent.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    try:
        outputs = engine.run(reqs, on_token=on_token).outputs
    finally:
        go.set()
        thread.join()

    assert [] == [str(c) for c in runtime.conflicts]
    for rid, (*_, kind), out in zip(ids, work, outputs, strict=True):
        if kind != "good":
            assert "error" == out.finish_reason and out.error, (rid, kind, out)
        elif out.finish_reason == "cancelled":
            assert rid in to_cancel and expected[rid][: len(out.token_ids)] == out.token_ids
        else:
            assert (out.finish_reason, expected[rid]) == ("length", out.token_ids), rid
