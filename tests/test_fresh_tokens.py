"""The scheduler's view of pending tokens: the lag is S - 1 batches with S slots, and a scheduler that asks
(`needs_fresh_tokens`) plans on every token, only on the steps it asks for, with the same tokens as ever."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import asyncbatch
from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.plugin_host import PluginHost
from asyncbatch.core.runtime.sim import CostModel, SimRuntime, SimRuntimeConfig
from asyncbatch.strategies.schedulers import Fifo

PROMPTS = [[(5 * i + j) % 400 + 3 for j in range(4 + 3 * i)] for i in range(6)]
BUFFERS = {1: "single", 2: "double", 3: {"name": "n_slot", "num_slots": 3}, 4: {"name": "n_slot", "num_slots": 4}}


@attrs.frozen
class WatcherConfig:
    ask: str = "never"  # never | always | every_third


class Watcher(Fifo):
    """FIFO that records what it saw: the in-flight count and every running request's pending tokens."""

    Config = WatcherConfig

    def __init__(self, config: WatcherConfig | None = None) -> None:
        super().__init__()
        self.ask = (config or WatcherConfig()).ask
        self.seen: list[tuple[int, int, int]] = []  # (batch, in_flight, most pending tokens of a running request)
        self.asked: list[tuple[int, int]] = []  # (batch, in_flight) of each question

    def needs_fresh_tokens(self, view: Any) -> bool:
        self.asked.append((view.batch_index, view.in_flight))
        return self.ask == "always" or (self.ask == "every_third" and view.batch_index % 3 == 0)

    def schedule(self, state: Any) -> None:
        self.seen.append((state.batch_index, state.in_flight, max((r.num_pending for r in state.running),
                                                                   default=0)))
        super().schedule(state)


class WatcherPlugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        register("watcher", Watcher)


HOST = PluginHost.create(extra_plugins=[WatcherPlugin()], load_entry_points=False)


def _engine(model, slots: int, scheduler: Any, *, cost: CostModel | None = None, order: str = "random") -> Engine:
    cfg = {"model": {"preset": "tiny", "dtype": "float64", "device": "cpu"}, "runtime": "sim",
           "buffers": BUFFERS[slots], "streams": "three", "graphs": "eager", "scheduler": scheduler,
           "batch": {"max_tokens": 64, "max_seqs": 8}, "cache": {"num_blocks": 80, "block_size": 4}}
    runtime = SimRuntime(SimRuntimeConfig(order=order, seed=1, cost=cost or CostModel()))
    return Engine.from_model(model, EngineConfig.from_dict(cfg, host=HOST), host=HOST, runtime=runtime)


def _params(**kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=10, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny64):
    return [o.token_ids for o in _engine(tiny64, 1, "fifo").generate(PROMPTS, _params())]


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_a_scheduler_sees_tokens_s_minus_one_batches_old(tiny64, slots):
    engine = _engine(tiny64, slots, "watcher")
    engine.generate(PROMPTS, _params())
    seen = engine.scheduler.seen

    assert slots - 1 == max(in_flight for _, in_flight, _ in seen)
    assert slots - 1 == max(pending for _, _, pending in seen)  # a decoding request lags by every batch in flight
    assert all(pending <= in_flight for _, in_flight, pending in seen)
    asked = engine.scheduler.asked  # only while batches are in flight: never in the synchronous loop
    assert (0 if slots == 1 else len(seen) - 1) == len(asked)
    assert all(in_flight > 0 for _, in_flight in asked)


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_asking_always_plans_every_batch_on_fresh_tokens_with_the_same_tokens(tiny64, reference, slots):
    engine = _engine(tiny64, slots, {"name": "watcher", "ask": "always"})
    out = engine.generate(PROMPTS, _params())
    seen = engine.scheduler.seen

    assert reference == [o.token_ids for o in out]
    assert {(0, 0)} == {(in_flight, pending) for _, in_flight, pending in seen}
    steps = engine.last_result.steps
    assert [s.batch > 0 for s in steps] == [s.fresh_tokens for s in steps]  # batch 0 had nothing in flight


def test_the_pipeline_waits_only_on_the_steps_the_scheduler_asks_for(tiny64, reference):
    engine = _engine(tiny64, 3, {"name": "watcher", "ask": "every_third"})
    out = engine.generate(PROMPTS, _params())
    scheduler = engine.scheduler

    assert reference == [o.token_ids for o in out]
    asked = {k for k, _ in scheduler.asked if k % 3 == 0}
    assert asked == {s.batch for s in engine.last_result.steps if s.fresh_tokens}
    seen = {k: (in_flight, pending) for k, in_flight, pending in scheduler.seen}
    assert all(seen[k] == (0, 0) for k in asked)
    assert any(seen[k][0] == 2 for k in seen if k not in asked)  # other steps still overlap


def test_stop_aware_wastes_no_rows_on_stopped_requests(tiny64):
    """A stop token found late costs the lagging pipeline one row per batch in flight; `stop_aware` plans on
    fresh tokens while a request could stop, so it schedules no row whose token is dropped."""
    greedy = _engine(tiny64, 1, "fifo").generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))
    stops = tuple({o.token_ids[3] for o in greedy})  # every request meets one of these early
    params = SamplingParams(max_new_tokens=16, stop_token_ids=stops, ignore_eos=True)

    lagging = _engine(tiny64, 3, "fifo")
    fresh = _engine(tiny64, 3, "stop_aware")
    lag_out, fresh_out = lagging.generate(PROMPTS, params), fresh.generate(PROMPTS, params)

    assert [o.token_ids for o in lag_out] == [o.token_ids for o in fresh_out]
    assert {"stop"} == {o.finish_reason for o in fresh_out}
    rows = {name: sum(s.num_seqs for s in e.last_result.steps) for name, e in (("lag", lagging), ("fresh", fresh))}
    wanted = sum(len(o.token_ids) for o in fresh_out) + sum(  # one row per sampled token plus prefill-only chunks
        s.num_seqs - s.num_decode for s in fresh.last_result.steps) - len(PROMPTS)
    assert wanted == rows["fresh"]
    assert rows["lag"] > rows["fresh"]


def test_the_cost_of_fresh_tokens_is_the_overlap_of_the_steps_that_ask(tiny64):
    """On the cost model (timed order), asking every step brings a double-buffered engine down to the
    synchronous loop's busy fraction: the host plans while the device idles."""
    cost = CostModel(cpu_prep_ms=3.0, cpu_update_ms=1.0, gpu_compute_ms=10.0, launch_eager_ms=0.5)

    def busy(slots: int, scheduler: Any) -> float:
        engine = _engine(tiny64, slots, scheduler, cost=cost, order="timed")
        engine.generate(PROMPTS, _params())
        return engine.last_result.summary.compute_busy_fraction

    sync, overlapped = busy(1, "fifo"), busy(2, "fifo")
    always = busy(2, {"name": "watcher", "ask": "always"})

    assert overlapped > 0.97
    assert sync < 0.75
    assert abs(always - sync) < 0.03
