"""Every sampling value the engine's per-step tables cannot hold fails its own request, naming the field and the
allowed range, before scheduling; the other requests of the call finish exactly as they would without it.

The step tables hold temperature and top_p as float32 bits, top_k and the two seed halves as int32 (see
`core.layout.HostBatchWriter.bind_row`); priorities are compared by the priority scheduler.
"""

from __future__ import annotations

import math

import pytest

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.errors import RequestError
from asyncbatch.core.types import validate_arrival

GOOD = [[5, 6, 7], [9] * 20, list(range(40, 70))]
INT32_MAX = 2**31 - 1


def _engine(model, scheduler: str = "fifo"):
    cfg = {"runtime": "cpu", "scheduler": scheduler, "batch": {"max_tokens": 64, "max_seqs": 8},
           "cache": {"num_blocks": 64, "block_size": 8}}
    return Engine.from_model(model, EngineConfig.from_dict(cfg))


@pytest.fixture(scope="module")
def reference(tiny64):
    """Each good prompt run alone (greedy, float64: the tokens do not depend on the batch)."""
    return [_engine(tiny64).generate([p], SamplingParams(max_new_tokens=6))[0].token_ids for p in GOOD]


# (field, bad value, fragments the error must hold: the field and its allowed range)
TEMPERATURE = ("temperature", "0 (greedy)", "[0.0001, 10000.0]")
TOP_K = ("top_k", f"[0, {INT32_MAX}]")
TOP_P = ("top_p", "(0, 1]")
SEED = ("seed", f"[0, {2**64 - 1}]")
MAX_NEW = ("max_new_tokens", f"[1, {INT32_MAX}]")
STOP = ("stop_token_ids", f"[0, {INT32_MAX}]")
PRIORITY = ("priority", f"[{-(2**63)}, {2**63 - 1}]")
IGNORE_EOS = ("ignore_eos", "bool")

BAD = [
    ("temperature", 1e-40, TEMPERATURE),  # a float32 subnormal: logits / t overflow to inf, garbage tokens
    ("temperature", 1e-5, TEMPERATURE),
    ("temperature", 1e5, TEMPERATURE),
    ("temperature", 1e300, TEMPERATURE),  # not even a float32
    ("temperature", math.inf, TEMPERATURE),
    ("temperature", -math.inf, TEMPERATURE),
    ("temperature", math.nan, TEMPERATURE),
    ("temperature", -0.5, TEMPERATURE),
    ("temperature", True, TEMPERATURE),
    ("temperature", "0.7", TEMPERATURE),
    ("temperature", None, TEMPERATURE),
    ("top_k", -1, TOP_K),
    ("top_k", 2**31, TOP_K),  # does not fit the int32 table
    ("top_k", 2**70, TOP_K),
    ("top_k", True, TOP_K),
    ("top_k", 1.5, TOP_K),
    ("top_k", "5", TOP_K),
    ("top_k", None, TOP_K),
    ("top_p", 0.0, TOP_P),
    ("top_p", -0.1, TOP_P),
    ("top_p", 1.5, TOP_P),
    ("top_p", 1e-300, TOP_P),  # rounds to 0 as a float32
    ("top_p", math.nan, TOP_P),
    ("top_p", math.inf, TOP_P),
    ("top_p", True, TOP_P),
    ("top_p", "0.9", TOP_P),
    ("top_p", None, TOP_P),
    ("seed", -1, SEED),
    ("seed", 2**64, SEED),  # would be silently truncated to 64 bits
    ("seed", 1.5, SEED),
    ("seed", True, SEED),
    ("seed", "1", SEED),
    ("max_new_tokens", 0, MAX_NEW),
    ("max_new_tokens", 2**31, MAX_NEW),
    ("max_new_tokens", True, MAX_NEW),
    ("max_new_tokens", 4.0, MAX_NEW),
    ("max_new_tokens", None, MAX_NEW),
    ("stop_token_ids", (-1,), STOP),
    ("stop_token_ids", (2**31,), STOP),
    ("stop_token_ids", (True,), STOP),
    ("stop_token_ids", (1.5,), STOP),
    ("stop_token_ids", ("3",), STOP),
    ("stop_token_ids", 5, STOP),  # not a list at all: still only this request fails
    ("stop_token_ids", "abc", STOP),
    ("stop_token_ids", None, STOP),
    ("priority", None, PRIORITY),
    ("priority", "high", PRIORITY),
    ("priority", True, PRIORITY),
    ("priority", 1.5, PRIORITY),
    ("priority", 2**63, PRIORITY),
    ("priority", -(2**63) - 1, PRIORITY),
    ("ignore_eos", 1, IGNORE_EOS),
    ("ignore_eos", "yes", IGNORE_EOS),
    ("ignore_eos", None, IGNORE_EOS),
]


def _id(case) -> str:
    field, value, _ = case
    text = repr(value)
    return f"{field}={text if len(text) <= 24 else f'<{value.bit_length()}-bit int>'}"


@pytest.mark.parametrize("scheduler", ["fifo", "priority"])
@pytest.mark.parametrize("case", BAD, ids=[_id(c) for c in BAD])
def test_a_bad_sampling_value_fails_only_its_request(tiny64, reference, case, scheduler):
    field, value, fragments = case
    params = SamplingParams(**{"max_new_tokens": 6, field: value})  # lazy: building it never raises
    good = SamplingParams(max_new_tokens=6)
    engine = _engine(tiny64, scheduler)

    outputs = engine.generate([GOOD[0], [1, 2, 3], GOOD[1], GOOD[2]], [good, params, good, good])

    bad = outputs[1]
    assert "error" == bad.finish_reason
    assert () == bad.token_ids
    for fragment in fragments:
        assert fragment in bad.error, (fragment, bad.error)
    assert reference == [outputs[i].token_ids for i in (0, 2, 3)]
    assert all("length" == outputs[i].finish_reason for i in (0, 2, 3))


@pytest.mark.parametrize("case", BAD, ids=[_id(c) for c in BAD])
def test_validate_raises_request_error_naming_the_field(case):
    field, value, fragments = case
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value}).validate()
    message = str(info.value)
    assert message.startswith(field)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"temperature": -0.0}, {"temperature": 1e-4}, {"temperature": 1e4}, {"temperature": 1},
    {"top_k": INT32_MAX}, {"top_p": 1}, {"top_p": 2.0**-126}, {"seed": 0}, {"seed": 2**64 - 1},
    {"max_new_tokens": INT32_MAX}, {"stop_token_ids": [0, INT32_MAX]}, {"stop_token_ids": range(3)},
    {"priority": -(2**63)}, {"priority": 2**63 - 1}, {"ignore_eos": True},
])
def test_values_at_the_limits_are_accepted(kwargs):
    SamplingParams(**kwargs).validate()


def test_limit_values_run(tiny64):
    """The extreme accepted values go through the step tables and the priority scheduler."""
    engine = _engine(tiny64, "priority")
    params = [
        SamplingParams(max_new_tokens=4, temperature=1e-4, top_k=INT32_MAX, top_p=2.0**-126, seed=2**64 - 1,
                       priority=2**63 - 1),
        SamplingParams(max_new_tokens=4, temperature=1e4, seed=0, priority=-(2**63)),
        SamplingParams(max_new_tokens=INT32_MAX, stop_token_ids=(0, 511)),
    ]
    outputs = engine.generate(GOOD, params)
    assert [o.finish_reason for o in outputs][:2] == ["length", "length"]
    assert outputs[2].finish_reason in ("length", "stop")
    assert all(o.error is None for o in outputs)


@pytest.mark.parametrize("t", [0, 0.0, 1, 2.5, 1e9])
def test_validate_arrival_accepts_finite_non_negative_times(t):
    validate_arrival(t)


@pytest.mark.parametrize("t", [-1e-9, -1, math.nan, math.inf, -math.inf, True, False, None, "1.0", 10**400, [0.0]],
                         ids=lambda t: "10**400" if t == 10**400 else repr(t))
def test_validate_arrival_rejects(t):
    with pytest.raises(RequestError, match=r"^arrival_time must be a finite number >= 0, got "):
        validate_arrival(t)
