"""Workload settings nobody tuned for: an empty JSONL file, a negative seed, a Poisson rate or turn gap so extreme
that arrivals leave the range time can hold, and shared-prefix counts past what can be built before a run.

Each was a silent or unbounded failure: an empty file ran zero requests and exited 0; seed -s repeated the
workload of s (so `repeat` from a negative seed ran one workload twice as two replicates); a rate of 1e-306
requests/s gave inf/NaN latencies on the sim runtime (1e-300: every latency 0) and a real-time run waited for
ever; 10^10 shared-prefix requests were built until memory ran out. Each is now a config error naming the key, or
a stream of its own."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from strategies import workload_seeds

from asyncbatch import ExperimentConfig, PluginHost, hookimpl
from asyncbatch.cli import main
from asyncbatch.core.errors import ConfigError, RequestError
from asyncbatch.core.runtime.sim_config import RandomChooser
from asyncbatch.core.types import ARRIVAL_MAX_S, SamplingParams, seeded_random, validate_arrival
from asyncbatch.plugins.experiment import run_experiment
from asyncbatch.plugins.prefix_workloads import Conversation, ConversationConfig, SharedPrefixConfig
from asyncbatch.plugins.workloads import (
    Arrival,
    JsonlConfig,
    JsonlPrompts,
    LengthDist,
    Synthetic,
    SyntheticConfig,
)

SMALL = SyntheticConfig(num_requests=3, prompt_len=LengthDist(dist="uniform", min=2, max=9),
                        output_len=LengthDist(dist="uniform", min=1, max=5))


def _synthetic(seed: int, config: SyntheticConfig = SMALL) -> list:
    return Synthetic(config, vocab_size=512, seed=seed).requests(SamplingParams())


# ---------------------------------------------------------------- an empty jsonl file


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
def test_a_jsonl_file_without_prompts_is_a_config_error(tmp_path, text):
    path = tmp_path / "p.jsonl"
    path.write_text(text)

    with pytest.raises(ConfigError) as info:
        JsonlPrompts(JsonlConfig(path=str(path)), vocab_size=512).requests(SamplingParams())

    assert ("workload.path", f"{path} holds no prompts") == (info.value.key, info.value.args[0].split(": ", 1)[1])


def test_a_run_of_an_empty_jsonl_file_exits_2_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("")
    out = tmp_path / "run"

    code = main(["--log-level", "warning", "run", "--set", f"workload={{name: jsonl, path: {path}}}",
                 "--set", "output.plots=false", "--out", str(out)])

    err = capsys.readouterr().err
    assert (2, f"asyncbatch: config error: workload.path: {path} holds no prompts", False) == (
        code, err.strip().splitlines()[-1], (out / "results.json").exists())


# ---------------------------------------------------------------- negative seeds


def test_seed_minus_one_is_not_the_workload_of_seed_one():
    requests = {seed: [(r.prompt_ids, r.params.max_new_tokens) for r in _synthetic(seed)] for seed in (-1, 1)}

    assert requests[-1] != requests[1]


def test_repeat_from_a_negative_seed_gives_distinct_replicates():
    # repetition i adds i to the seed: from -1, the repetitions are -1, 0 and 1
    prompts = [tuple(r.prompt_ids for r in _synthetic(seed)) for seed in (-1, 0, 1)]

    assert 3 == len(set(prompts))


def test_poisson_arrivals_of_a_negative_seed_are_their_own():
    config = SyntheticConfig(num_requests=4, arrival=Arrival(process="poisson", rate=5.0))

    times = {seed: [r.arrival_time for r in _synthetic(seed, config)] for seed in (-3, 3)}

    assert times[-3] != times[3]


def test_the_sim_chooser_of_a_negative_seed_is_its_own():
    picks = {seed: [RandomChooser(seed).choose(1000) for _ in range(8)] for seed in (-2, 2)}

    assert picks[-2] != picks[2]


@given(workload_seeds(), workload_seeds())
def test_distinct_seeds_give_distinct_streams_and_non_negative_ones_keep_theirs(a, b):
    if a != b:
        assert seeded_random(a).getrandbits(64) != seeded_random(b).getrandbits(64)
    if a >= 0:  # the workloads of every seed that worked before are unchanged
        assert random.Random(a).getrandbits(64) == seeded_random(a).getrandbits(64)


# ---------------------------------------------------------------- arrivals past what time can hold


@pytest.mark.parametrize("rate", [1e-320, 1e-306, 1e-12])
def test_a_poisson_rate_whose_arrivals_leave_the_time_range_is_a_config_error(rate):
    config = SyntheticConfig(num_requests=4, arrival=Arrival(process="poisson", rate=rate))

    with pytest.raises(ConfigError) as info:
        _synthetic(0, config)

    assert ("workload.arrival.rate", True) == (info.value.key, f"past the limit of {ARRIVAL_MAX_S:g} s" in
                                               str(info.value))
    # a low rate whose arrivals stay in range still runs
    low = SyntheticConfig(num_requests=2, arrival=Arrival(process="poisson", rate=1e-6))
    assert [True, True] == [0 < r.arrival_time <= ARRIVAL_MAX_S for r in _synthetic(0, low)]


def test_a_poisson_run_of_the_sim_runtime_with_a_tiny_rate_fails_naming_the_rate(tmp_path, capsys):
    out = tmp_path / "run"

    code = main(["--log-level", "warning", "run", "--set", "workload.num_requests=3",
                 "--set", "workload.arrival={process: poisson, rate: 1e-306}",
                 "--set", "engine.runtime={name: sim, order: timed, check: false}",
                 "--set", "output.plots=false", "--out", str(out)])

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (2, "asyncbatch: config error: workload.arrival.rate:", False) == (
        code, err[: len("asyncbatch: config error: workload.arrival.rate:")], (out / "results.json").exists())


@pytest.mark.parametrize("gap", [1e308, 6e8])
def test_a_turn_gap_that_puts_turns_past_the_time_range_is_a_config_error(gap):
    config = ConversationConfig(num_conversations=2, turns=3, turn_gap_s=gap, system_len=LengthDist(value=2))

    with pytest.raises(ConfigError) as info:
        Conversation(config, vocab_size=512).requests(SamplingParams())

    assert "workload.turn_gap_s" == info.value.key


def test_a_request_arriving_past_the_limit_fails_alone():
    validate_arrival(ARRIVAL_MAX_S)
    with pytest.raises(RequestError) as info:
        validate_arrival(1e300)

    assert f"arrival_time must be at most {ARRIVAL_MAX_S:g} seconds after the run starts, got 1e+300" == str(
        info.value)


def test_the_engine_fails_only_the_request_that_arrives_too_late(tiny32):
    from asyncbatch import Engine, EngineConfig, Request

    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": {"name": "sim", "order": "timed",
                                                                           "check": False}}))
    params = SamplingParams(max_new_tokens=2)
    outputs = engine.run([Request("a", (1, 2), params, 0.0), Request("b", (3, 4), params, 1e300)]).outputs

    assert [("length", None), ("error", True)] == [
        (o.finish_reason, None if o.error is None else "at most" in o.error) for o in outputs]


# ---------------------------------------------------------------- request counts of the shared-prefix workloads


@pytest.mark.parametrize(("make", "key"), [
    (lambda: SharedPrefixConfig(num_prefixes=10**8, questions_per_prefix=100), "workload.questions_per_prefix"),
    (lambda: ConversationConfig(num_conversations=2**20, turns=2**5), "workload.turns"),
])
def test_shared_prefix_workloads_bound_their_request_count_as_synthetic_does(make, key):
    with pytest.raises(ConfigError) as info:
        make()

    assert (key, True) == (info.value.key, "must be at most 16777216" in str(info.value))
    # the bound is on the product, not on each count: exactly 2**24 requests are allowed
    assert 2**24 == SharedPrefixConfig(num_prefixes=2**12, questions_per_prefix=2**12).questions_per_prefix * 2**12


def test_a_shared_prefix_run_past_the_bound_exits_2_at_load(tmp_path, capsys):
    code = main(["--log-level", "warning", "run", "--set",
                 "workload={name: shared_prefix, num_prefixes: 100000000, questions_per_prefix: 100}",
                 "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err.strip()
    assert (2, "asyncbatch: config error: workload.questions_per_prefix: num_prefixes x questions_per_prefix is "
               "the number of requests, which must be at most 16777216 (the requests are built before the run), "
               "got 100000000 x 100 = 10000000000") == (code, err)


def test_the_results_of_a_run_with_a_negative_seed_differ_from_the_positive_one(tmp_path, capsys):
    digests = {}
    for seed in (-1, 1):
        out = tmp_path / f"s{seed}"
        code = main(["--log-level", "warning", "run", "--set", f"seed={seed}", "--set", "workload.num_requests=2",
                     "--set", "workload.prompt_len={dist: uniform, min: 2, max: 40}",
                     "--set", "workload.output_len={dist: fixed, value: 2}", "--set", "output.plots=false",
                     "--out", str(out)])
        assert 0 == code, capsys.readouterr().err
        digests[seed] = [o["prompt_tokens"] for o in json.loads((out / "results.json").read_text())["outputs"]]

    assert digests[-1] != digests[1]


# ---------------------------------------------------------------- a workload that makes no requests


class _NoRequests:
    """A plugin workload that makes nothing (a filter that matched no rows, say)."""

    Config = SyntheticConfig

    def __init__(self, config, *, vocab_size, seed=0):
        pass

    def requests(self, sampling, tokenizer=None):
        return []


class _NoRequestsPlugin:
    @hookimpl
    def asyncbatch_register_workloads(self, register):
        register("nothing", _NoRequests, config=SyntheticConfig)


def test_a_workload_that_makes_no_requests_is_a_config_error_not_an_empty_success(tmp_path):
    host = PluginHost.create(extra_plugins=[_NoRequestsPlugin()], load_entry_points=False)
    cfg = ExperimentConfig.from_dict({"workload": {"name": "nothing"}, "output": {"plots": False}}, host=host)

    with pytest.raises(ConfigError) as info:
        run_experiment(cfg, tmp_path / "run", progress=False, echo=lambda _: None, host=host)

    assert ("workload", "workload 'nothing' made no requests: a run needs at least one") == (
        info.value.key, str(info.value).split(": ", 1)[1])
