"""Request-level behaviour: bad input fails only that request, stop tokens, cancellation, streaming, sampling
reproducibility, online arrivals, length limits and the no-wasted-step prediction."""

from __future__ import annotations

import threading

import pytest

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.runtime.sim import SimRuntime, SimRuntimeConfig

GOOD = [[5, 6, 7], [9] * 20, list(range(40, 70))]


def _engine(model, **cfg):
    base = {"runtime": "cpu", "batch": {"max_tokens": 64, "max_seqs": 8}, "cache": {"num_blocks": 64, "block_size": 8}}
    return Engine.from_model(model, EngineConfig.from_dict({**base, **cfg}))


@pytest.fixture(scope="module")
def reference(tiny64):
    return [o.token_ids for o in _engine(tiny64).generate(GOOD, SamplingParams(max_new_tokens=6))]


@pytest.mark.parametrize("prompt,params,message", [
    ([], SamplingParams(max_new_tokens=4), "empty prompt"),
    ([1, 512, 3], SamplingParams(max_new_tokens=4), "outside the vocabulary"),
    ([1, -1], SamplingParams(max_new_tokens=4), "outside the vocabulary"),
    ([1, 2.0], SamplingParams(max_new_tokens=4), "prompt token 2.0 at position 1 is a float, not an int"),
    ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ([1, 2], SamplingParams(temperature=-0.5), "temperature must be >= 0"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
    ([1, 2], SamplingParams(top_k=-3), "top_k must be an int >= 0"),
    ([1, 2], SamplingParams(stop_token_ids=(600,)), "stop token 600 is outside"),
    ([1] * 600, SamplingParams(), "leaves no room to generate"),
])
def test_a_bad_request_fails_alone(tiny64, reference, prompt, params, message):
    """The bad request ends with finish_reason 'error' and a message naming the problem; the others finish
    exactly as they would without it."""
    engine = _engine(tiny64)
    prompts = [GOOD[0], prompt, GOOD[1], GOOD[2]]
    good = SamplingParams(max_new_tokens=6)

    outputs = engine.generate(prompts, [good, params, good, good])

    assert "error" == outputs[1].finish_reason
    assert message in outputs[1].error
    assert () == outputs[1].token_ids
    assert reference == [outputs[i].token_ids for i in (0, 2, 3)]


def test_call_level_mistakes_raise_before_anything_runs(tiny64):
    """Wrong shapes of the call itself raise at once with the reason."""
    engine = _engine(tiny64)
    with pytest.raises(TypeError, match="tokenizer"):
        engine.generate(["hello"])
    with pytest.raises(ValueError, match="2 prompts but 3 SamplingParams"):
        engine.generate(GOOD[:2], [SamplingParams()] * 3)
    with pytest.raises(ValueError, match="unique"):
        engine.generate(GOOD[:2], request_ids=["a", "a"])
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("not a list")
    with pytest.raises(TypeError, match="params must be a SamplingParams or a list of them, got str"):
        engine.generate(GOOD[:1], "greedy")
    with pytest.raises(TypeError, match="params 1 must be a SamplingParams, got dict"):
        engine.generate(GOOD[:2], [SamplingParams(), {"max_new_tokens": 3}])


def test_stop_tokens_end_the_request_and_later_tokens_are_dropped(tiny64, reference):
    """With three slots the host learns of a stop token two batches late; nothing after it is delivered."""
    stop = reference[1][2]
    engine = Engine.from_model(tiny64, EngineConfig.from_dict({
        "runtime": "sim", "buffers": {"name": "n_slot", "num_slots": 3}, "batch": {"max_tokens": 64, "max_seqs": 8},
        "cache": {"num_blocks": 64, "block_size": 8}}), runtime=SimRuntime(SimRuntimeConfig(seed=1)))

    outputs = engine.generate(GOOD, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)))

    first = reference[1].index(stop)
    assert reference[1][: first + 1] == outputs[1].token_ids
    assert "stop" == outputs[1].finish_reason
    assert [] == engine.runtime.conflicts


def test_length_finishes_waste_no_step(tiny64):
    """The host predicts length finishes: one request with N new tokens takes exactly N steps, also when it
    runs two batches ahead."""
    for buffers in ("single", "double", {"name": "n_slot", "num_slots": 3}):
        engine = _engine(tiny64, buffers=buffers)
        engine.generate([GOOD[2]], SamplingParams(max_new_tokens=7))
        assert 7 == len(engine.last_result.steps)


def test_cancel_ends_one_request_and_frees_its_resources(tiny64):
    """A request cancelled mid-run ends 'cancelled' with the tokens it had; the others finish; nothing leaks
    (the engine checks every block and row came back)."""
    engine = _engine(tiny64)
    seen = []

    def on_token(event):
        seen.append(event)
        if event.request_id == "victim" and event.index == 2:
            engine.cancel("victim")

    outputs = engine.generate(GOOD, SamplingParams(max_new_tokens=12), request_ids=["a", "victim", "b"],
                              on_token=on_token)

    assert "cancelled" == outputs[1].finish_reason
    assert 3 <= len(outputs[1].token_ids) < 12
    assert ["length", "length"] == [outputs[0].finish_reason, outputs[2].finish_reason]


def test_stream_yields_every_token_in_order(tiny64, reference):
    """Streaming delivers each request's tokens in order; the last event carries the finish reason."""
    engine = _engine(tiny64)
    events = list(engine.stream(GOOD, SamplingParams(max_new_tokens=6)))

    by_request: dict[str, list] = {}
    for e in events:
        by_request.setdefault(e.request_id, []).append(e)
    assert reference == [tuple(e.token_id for e in by_request[str(i)]) for i in range(3)]
    assert all(list(range(6)) == [e.index for e in evs] for evs in by_request.values())
    assert all("length" == evs[-1].finish_reason for evs in by_request.values())
    assert threading.active_count() >= 1


def test_seeded_sampling_does_not_depend_on_the_batch(tiny64):
    """A seeded request samples the same tokens alone or among others, under any pipeline."""
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    alone = _engine(tiny64).generate([GOOD[1]], params)[0].token_ids
    crowded = _engine(tiny64, buffers={"name": "n_slot", "num_slots": 3}).generate(
        GOOD, [SamplingParams(max_new_tokens=4, temperature=1.2), params, SamplingParams(max_new_tokens=8)])

    assert alone == crowded[1].token_ids
    other_seed = _engine(tiny64).generate([GOOD[1]], SamplingParams(**{**_asdict(params), "seed": 99}))
    assert alone != other_seed[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(tiny64, reference):
    """Filters that leave one candidate reduce sampling to argmax."""
    top1 = _engine(tiny64).generate(GOOD, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1, seed=3))
    nucleus = _engine(tiny64).generate(GOOD, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3))

    assert reference == [o.token_ids for o in top1]
    assert reference == [o.token_ids for o in nucleus]


def test_generation_stops_at_the_context_limit(tiny64):
    """A request that would outgrow the context (here, the cache) ends with 'length' at the limit."""
    engine = _engine(tiny64, cache={"num_blocks": 5, "block_size": 8})  # 4 usable blocks: 32 tokens
    out = engine.generate([list(range(1, 29))], SamplingParams(max_new_tokens=50))[0]

    assert "length" == out.finish_reason
    assert 32 == len(out.prompt_ids) + len(out.token_ids)


def test_online_arrivals_are_honoured_in_virtual_time(tiny64):
    """On the sim runtime (virtual time) a request is never served before it arrives."""
    engine = Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "sim"}),
                               runtime=SimRuntime(SimRuntimeConfig(order="timed", check=False)))
    requests = engine.make_requests(GOOD, SamplingParams(max_new_tokens=4), arrival_times=[0.0, 0.5, 1.0])

    outputs = engine.run(requests).outputs

    for out, arrival in zip(outputs, [0.0, 0.5, 1.0]):
        assert out.token_times[0] >= arrival
        assert out.ttft is not None and out.ttft >= 0


def _asdict(params):
    import attrs

    return attrs.asdict(params)
