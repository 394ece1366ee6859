"""Host phase timings count host work only. The `cpu` and `sim` runtimes run the model's forward on the host thread,
and where it runs depends on the buffer policy (`sim`: in a wait under `single`, on entering the next host phase
under `double`); that time is the device's and must never show up as schedule, prepare, launch or update time."""

from __future__ import annotations

import time

import pytest

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.testing import engine_dict

FORWARD_S = 0.04  # a forward slower than any host phase of the tiny model, so that it cannot hide in the noise

RUNTIMES = {
    "cpu": "cpu",
    "sim-timed": {"name": "sim", "order": "timed", "check": False},
    "sim-random": {"name": "sim", "order": "random", "check": True},
}


@pytest.mark.parametrize("buffers", ["single", "double"])
@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_host_phases_exclude_the_forward_whatever_the_buffers(tiny64, monkeypatch, runtime, buffers):
    forward = tiny64.forward
    forwards = []

    def slow_forward(*args, **kwargs):
        forwards.append(1)
        time.sleep(FORWARD_S)
        return forward(*args, **kwargs)

    config = engine_dict(buffers, "three", "eager", "fifo")
    config["runtime"] = RUNTIMES[runtime]
    engine = Engine.from_model(tiny64, EngineConfig.from_dict(config))
    monkeypatch.setattr(tiny64, "forward", slow_forward)  # after the build: the timed run only
    result = engine.run(engine.make_requests([[1, 2, 3, 4]] * 3, SamplingParams(max_new_tokens=5)))
    steps = result.steps

    phases = ("schedule_s", "prepare_s", "launch_s", "update_s")
    slow = [(s.batch, p, round(getattr(s, p), 3)) for s in steps for p in phases if getattr(s, p) > FORWARD_S / 2]
    assert [] == slow
    assert [] == [s.batch for s in steps if s.host_s > FORWARD_S / 2]  # `host ms/step` in the report
    assert len(steps) == len(forwards)
    # The forward's time is not lost: it is waiting on the device (what the serving step-time histogram adds up).
    assert sum(s.wait_s for s in steps) >= len(forwards) * FORWARD_S
