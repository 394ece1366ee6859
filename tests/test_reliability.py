"""No request, cancel, callback or stream consumer can fail a run, hang the engine or lose an output."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core import plugin_host
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.hookspecs import hookimpl
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import PluginHost, get_plugin_host

BUFFERS = ["single", "double", {"name": "n_slot", "num_slots": 3}]
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
pytestmark = pytest.mark.timeout(120)  # a hang fails, it does not block the suite


def _engine(model, buffers="double", scheduler="fifo", host=None, **batch):
    cfg = EngineConfig.from_dict({"runtime": "cpu", "buffers": buffers, "scheduler": scheduler,
                                  "batch": {"max_tokens": 64, "max_seqs": 8, **batch},
                                  "cache": {"num_blocks": 64, "block_size": 8}})
    return Engine.from_model(model, cfg, host=host)


def _alone(model, prompt, params):
    return _engine(model).generate([prompt], params)[0].token_ids


@pytest.mark.parametrize("buffers", BUFFERS, ids=str)
def test_cancelling_the_last_unfinished_request_ends_the_run_with_every_output(tiny64, buffers):
    """The loop looks again after applying cancellations: no 'no progress possible', nothing lost."""
    engine = _engine(tiny64, buffers)
    params = [SamplingParams(max_new_tokens=2, ignore_eos=True), SamplingParams(max_new_tokens=40, ignore_eos=True)]
    reqs = engine.make_requests(PROMPTS[:2], params)

    def on_token(ev):
        if ev.request_id == reqs[0].request_id and ev.finish_reason == "length":
            engine.cancel(reqs[1].request_id)

    outputs = engine.run(reqs, on_token=on_token).outputs

    assert ["length", "cancelled"] == [o.finish_reason for o in outputs]
    assert 2 == len(outputs[0].token_ids)


@pytest.mark.parametrize("scheduler", ["fifo", "prefill_first", "shortest_first", "priority"])
def test_a_prompt_that_can_never_be_scheduled_fails_alone(tiny64, scheduler):
    """Without chunked prefill a prompt over `batch.max_tokens` fits no batch: it fails with the cause named,
    and the others run as if it were not there."""
    engine = _engine(tiny64, scheduler={"name": scheduler, "chunked_prefill": False}, max_tokens=16)
    long_prompt = list(range(1, 30))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)

    outputs = engine.generate([PROMPTS[0], long_prompt, PROMPTS[1]], params)

    assert ["length", "error", "length"] == [o.finish_reason for o in outputs]
    assert "chunked_prefill: false" in outputs[1].error and "batch.max_tokens=16" in outputs[1].error
    assert _alone(tiny64, PROMPTS[1], params) == outputs[2].token_ids


def test_calling_the_engine_back_from_a_callback_raises_instead_of_deadlocking(tiny64):
    engine = _engine(tiny64)
    seen: list[BaseException] = []

    def on_token(ev):
        if not seen:
            try:
                engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1))
            except RuntimeError as exc:
                seen.append(exc)

    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True), on_token=on_token)

    assert 1 == len(seen) and "after the run returns" in str(seen[0])
    assert ["length"] * 3 == [o.finish_reason for o in outputs]


def test_a_lifecycle_hook_calling_back_fails_as_a_hook_error(tiny64):
    class CallsBack:
        engine = None

        @hookimpl
        def asyncbatch_step_finished(self, stats):
            self.engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1))

    plugin = CallsBack()
    engine = _engine(tiny64, host=PluginHost.create(extra_plugins=[plugin], load_entry_points=False))
    plugin.engine = engine

    result = engine.run(engine.make_requests(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True)))

    assert result.summary.hook_errors == result.summary.steps > 0
    assert ["length"] * 3 == [o.finish_reason for o in result.outputs]


def test_abandoning_a_stream_cancels_its_requests(tiny64):
    engine = _engine(tiny64)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)

    for _ in engine.stream(PROMPTS, params):
        break

    reasons = [o.finish_reason for o in engine.last_result.outputs]
    assert {"cancelled"} == set(reasons)
    assert sum(len(o.token_ids) for o in engine.last_result.outputs) < 20
    assert ["length"] == [o.finish_reason for o in engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))]


def test_a_stream_ends_every_request_with_an_event(tiny64):
    """Failed (validation) and cancelled requests get a final event with token_id -1 and their reason."""
    engine = _engine(tiny64)
    params = [SamplingParams(max_new_tokens=3, ignore_eos=True), SamplingParams(max_new_tokens=-1),
              SamplingParams(max_new_tokens=200, ignore_eos=True)]
    reqs = engine.make_requests(PROMPTS, params)
    engine.cancel(reqs[2].request_id)  # before the run starts: applied when it does

    events = []
    ended = threading.Event()

    def consume():
        events.extend(engine.stream([r.prompt_ids for r in reqs], params,
                                    request_ids=[r.request_id for r in reqs]))
        ended.set()

    consume()

    finals = {e.request_id: (e.token_id, e.finish_reason) for e in events if e.finish_reason is not None}
    assert ended.is_set()
    assert "length" == finals[reqs[0].request_id][1]
    assert (-1, "error") == finals[reqs[1].request_id]
    assert (-1, "cancelled") == finals[reqs[2].request_id]


def test_a_cancel_sent_before_the_run_applies_to_it_and_ids_do_not_repeat(tiny64):
    engine = _engine(tiny64)
    first = engine.make_requests(PROMPTS, SamplingParams(max_new_tokens=4, ignore_eos=True))
    second = engine.make_requests(PROMPTS, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.cancel(second[1].request_id)

    out1 = engine.run(first).outputs
    out2 = engine.run(second).outputs

    assert not {r.request_id for r in first} & {r.request_id for r in second}
    assert ["length"] * 3 == [o.finish_reason for o in out1]
    assert ["length", "cancelled", "length"] == [o.finish_reason for o in out2]
    assert () == out2[1].token_ids


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_bad_arrival_time_fails_its_request_and_nothing_hangs(tiny64, bad):
    engine = _engine(tiny64)
    reqs = engine.make_requests(PROMPTS, SamplingParams(max_new_tokens=3, ignore_eos=True),
                                arrival_times=[0.0, bad, 0.01])

    outputs = engine.run(reqs).outputs

    assert ["length", "error", "length"] == [o.finish_reason for o in outputs]
    assert "arrival_time" in outputs[1].error


def test_unseeded_sampling_follows_the_request_id_not_its_position(tiny64):
    engine = _engine(tiny64)
    params = SamplingParams(max_new_tokens=6, temperature=0.9, ignore_eos=True)

    ab = engine.generate(PROMPTS[:2], params, request_ids=["a", "b"])
    ba = engine.generate(PROMPTS[1::-1], params, request_ids=["b", "a"])

    assert ab[0].token_ids == ba[1].token_ids and ab[1].token_ids == ba[0].token_ids


def test_release_gives_the_model_back_to_its_owner():
    """`from_model` switches the caller's model to asyncbatch attention; `release()` switches it back, so the
    owner's own `generate()` works, and the engine's next run switches it again."""
    model, _ = build_model(ModelConfig(dtype="float32", device="cpu"), get_plugin_host())  # not shared
    before = model.config._attn_implementation
    engine = _engine(model)
    tokens = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids

    engine.release()
    with torch.no_grad():
        own = model.generate(torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                             max_new_tokens=3, min_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)

    assert before == model.config._attn_implementation
    assert list(tokens) == own[0, 3:].tolist()
    assert tokens == engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids
    engine.release()


def test_hook_failures_are_counted_but_kept_bounded(tiny64, monkeypatch):
    monkeypatch.setattr(plugin_host, "MAX_KEPT_HOOK_ERRORS", 5)

    class Fails:
        @hookimpl
        def asyncbatch_step_finished(self, stats):
            raise ValueError("boom")

    host = PluginHost.create(extra_plugins=[Fails()], load_entry_points=False)
    result = _engine(tiny64, host=host).run(
        _engine(tiny64).make_requests(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True)))

    assert result.summary.steps == result.summary.hook_errors == host.hook_error_count > 5
    assert 5 == len(host.hook_errors)


def test_a_kv_cache_that_cannot_fit_is_a_config_error_naming_the_key(tiny64, monkeypatch):
    """Checked before any allocation: torch never gets to fail on it."""
    from asyncbatch.core.errors import ConfigError
    from asyncbatch.core.runtime.cpu import CpuRuntime

    monkeypatch.setattr(CpuRuntime, "free_memory", lambda self: 1 << 20)
    cfg = EngineConfig.from_dict({"runtime": "cpu", "cache": {"num_blocks": 1000, "block_size": 8}})

    with pytest.raises(ConfigError, match=r"engine\.cache\.num_blocks: 1000 KV blocks .* GiB is free"):
        Engine.from_model(tiny64, cfg)
