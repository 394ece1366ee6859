"""Requests a sixth probe found mishandled. `Engine.run` ran two requests with one id without a word (a cancel of
that id, its derived seed and its stream events could not tell them apart; `generate` refused the same call), died
with an AttributeError on a list of prompts and on a `Request` whose params are not a `SamplingParams` (which should
fail that request alone), and took non-string ids that `cancel("5")` could never find. A jsonl file with an id given
twice was refused without saying which lines."""

from __future__ import annotations

import pytest

from asyncbatch import Engine, EngineConfig, Request, SamplingParams
from asyncbatch.core.errors import ConfigError
from asyncbatch.plugins.workloads import JsonlConfig, JsonlPrompts

PARAMS = SamplingParams(max_new_tokens=2)


@pytest.fixture(scope="module")
def engine(tiny32):
    return Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))


def test_run_refuses_two_requests_with_one_id(engine):
    with pytest.raises(ValueError) as info:
        engine.run([Request("a", (1, 2), PARAMS), Request("a", (3, 4), PARAMS)])

    assert "request id 'a' is used by more than one request (request 1)" == str(info.value)


def test_run_refuses_what_is_not_a_request(engine):
    with pytest.raises(TypeError) as info:
        engine.run([[1, 2]])

    assert ("request 0 must be an asyncbatch Request (Engine.make_requests builds them from prompts), got list"
            == str(info.value))


@pytest.mark.parametrize("call", [
    lambda e: e.run([Request(5, (1, 2), PARAMS)]),
    lambda e: e.generate([[1, 2]], PARAMS, request_ids=[5]),
])
def test_request_ids_must_be_strings(engine, call):
    with pytest.raises(TypeError) as info:
        call(engine)

    assert "request ids must be strings, got int 5" == str(info.value)


def test_params_that_are_not_sampling_params_fail_that_request_alone(engine):
    outputs = engine.run([Request("bad", (1, 2), {"max_new_tokens": 2}), Request("good", (1, 2), PARAMS)]).outputs

    assert [("error", "params must be a SamplingParams, got dict"), ("length", None)] == [
        (o.finish_reason, o.error) for o in outputs]


@pytest.mark.parametrize(("rows", "line", "rid", "other"), [
    ('{"id": "a", "prompt_ids": [1]}\n{"id": "a", "prompt_ids": [2]}\n', 2, "a", 1),
    # a row without an id is req-<n>: an explicit id can take that name
    ('{"prompt_ids": [1]}\n{"id": "req-0", "prompt_ids": [2]}\n', 2, "req-0", 1),
])
def test_a_jsonl_id_given_twice_names_both_lines(tmp_path, rows, line, rid, other):
    path = tmp_path / "p.jsonl"
    path.write_text(rows)

    with pytest.raises(ConfigError) as info:
        JsonlPrompts(JsonlConfig(path=str(path)), vocab_size=512).requests(SamplingParams())

    assert ("workload.path", f"{path}:{line}: request id {rid!r} is also the id of {path}:{other} (ids must be "
            "distinct; a row without one is named req-<n>, n counting rows from 0)") == (
        info.value.key, info.value.message)


def test_request_ids_given_as_one_string_are_refused(engine):
    # "ab" used to name two prompts 'a' and 'b'
    with pytest.raises(TypeError) as info:
        engine.generate([[1], [2]], PARAMS, request_ids="ab")

    assert "request_ids must be a list of strings, one per prompt, got the string 'ab'" == str(info.value)
