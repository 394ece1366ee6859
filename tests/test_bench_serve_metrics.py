"""bench-serve's numbers without a server: per-request latencies, spreads, throughputs and goodput against values
computed by hand, `--slo` and `--request-rate` parsing, arrival schedules, and the prompts it sends."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch.core.errors import ConfigError
from asyncbatch.serve.bench import parse_rates
from asyncbatch.serve.bench_client import BenchRequest, arrival_times, request_body
from asyncbatch.serve.bench_metrics import BenchMetrics, RequestRecord, Slo, Spread, max_overlap
from asyncbatch.serve.bench_workload import load_requests

# Times exact in binary, so that the expected values below are exact too.
R0 = RequestRecord(0, 3, 10, scheduled_s=0.0, sent_s=0.0, end_s=0.5, chunk_s=(0.125, 0.25, 0.5), output_tokens=3)
R1 = RequestRecord(1, 2, 20, scheduled_s=0.5, sent_s=0.5, end_s=1.0, chunk_s=(0.75, 0.875), output_tokens=2)
FAILED = RequestRecord(2, 4, 30, scheduled_s=0.5, sent_s=0.5, end_s=0.625, success=False, status=429,
                       error="HTTP 429: rate limited")


def test_a_records_latencies():
    assert (0.125, [0.125, 0.25], 0.1875, 0.5) == (R0.ttft, R0.itl, R0.tpot, R0.e2e)
    assert (0.25, [0.125], 0.25, 0.5) == (R1.ttft, R1.itl, R1.tpot, R1.e2e)


def test_one_token_has_no_tpot_and_no_token_has_no_ttft():
    one = RequestRecord(0, 1, 5, 0.0, 0.0, 0.25, chunk_s=(0.25,), output_tokens=1)
    assert (0.25, None, []) == (one.ttft, one.tpot, one.itl)
    assert (None, None) == (FAILED.ttft, FAILED.tpot)


def test_metrics_of_two_completed_and_one_failed_request():
    m = BenchMetrics.compute([R0, R1, FAILED], Slo(ttft_ms=200.0))
    assert (2, 1, 1.0, 30, 5) == (m.completed, m.failed, m.duration_s, m.input_tokens, m.output_tokens)
    assert (2.0, 5.0, 35.0) == (m.request_throughput, m.output_throughput, m.total_token_throughput)
    # p90 of two values interpolates 90% of the way: 0.125 + 0.9 * 0.125
    assert m.ttft == Spread(0.1875, 0.1875, pytest.approx(0.2375), pytest.approx(0.24875))
    assert m.tpot == Spread(pytest.approx(0.21875), pytest.approx(0.21875), pytest.approx(0.24375),
                            pytest.approx(0.249375))
    # ITL pools every gap of every request: [0.125, 0.25] and [0.125]
    assert m.itl == Spread(pytest.approx(0.5 / 3), 0.125, pytest.approx(0.225), pytest.approx(0.2475))
    assert Spread(0.5, 0.5, 0.5, 0.5) == m.e2e
    assert (1, 1.0) == (m.slo_met, m.goodput)  # R1's TTFT of 250 ms misses 200 ms
    assert {"HTTP 429: rate limited": 1} == m.errors


def test_a_given_duration_divides_the_throughputs():
    m = BenchMetrics.compute([R0, R1], duration_s=2.0)
    assert (1.0, 2.5, 17.5, None, None) == (m.request_throughput, m.output_throughput,
                                            m.total_token_throughput, m.goodput, m.slo_met)


@pytest.mark.parametrize(("slo", "met"), [
    (Slo(tpot_ms=187.5), 1), (Slo(tpot_ms=250.0), 2), (Slo(e2e_ms=499.0), 0), (Slo(e2e_ms=500.0), 2),
    (Slo(ttft_ms=250.0, tpot_ms=187.5), 1), (Slo(ttft_ms=100.0), 0)])
def test_goodput_counts_requests_meeting_every_objective(slo, met):
    m = BenchMetrics.compute([R0, R1, FAILED], slo)
    assert (met, met / 1.0) == (m.slo_met, m.goodput)


def test_a_one_token_request_cannot_miss_the_tpot_objective():
    one = RequestRecord(0, 1, 5, 0.0, 0.0, 0.25, chunk_s=(0.25,), output_tokens=1)
    assert [True, False] == [Slo(tpot_ms=1.0).met(one), Slo(tpot_ms=1.0, ttft_ms=100.0).met(one)]


def test_row_is_flat_and_in_milliseconds():
    row = BenchMetrics.compute([R0, R1]).row()
    assert (187.5, 500.0, None, 2) == (row["ttft_mean_ms"], row["e2e_p99_ms"], row["goodput"], row["completed"])
    assert 10 + 16 == len(row)  # ten counts and rates, four spreads of four numbers


def test_nothing_completed_gives_no_latencies_and_zero_rates():
    m = BenchMetrics.compute([FAILED], Slo(ttft_ms=1.0))
    assert (0, 1, Spread(), 0.0, 0, 0.0) == (m.completed, m.failed, m.ttft, m.request_throughput, m.slo_met,
                                             m.goodput)
    assert (0, 0.0) == (BenchMetrics.compute([]).completed, BenchMetrics.compute([]).duration_s)


def test_max_overlap_counts_requests_in_flight():
    def rec(sent, end):
        return RequestRecord(0, 1, 1, sent, sent, end)

    assert 2 == max_overlap([rec(0, 2), rec(1, 3), rec(2, 4)])  # an end and a send at 2: the end first
    assert 3 == max_overlap([rec(0, 5), rec(1, 3), rec(2, 4)])
    assert 0 == max_overlap([])


_times = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=0, max_size=6)


@st.composite
def records(draw):
    out = []
    for i in range(draw(st.integers(0, 12))):
        sent = draw(st.floats(0.0, 10.0))
        chunks = tuple(sorted(sent + t for t in draw(_times)))
        end = max((sent, *chunks)) + draw(st.floats(0.0, 1.0))
        tokens = draw(st.integers(len(chunks), 3 * len(chunks) + 1)) if chunks else 0
        out.append(RequestRecord(i, 8, draw(st.integers(1, 50)), sent, sent, end, chunks, tokens,
                                 success=bool(chunks) and draw(st.booleans())))
    return out


slos = st.builds(Slo, *(st.one_of(st.none(), st.floats(1.0, 20000.0)) for _ in range(3)))


@settings(max_examples=200, deadline=None)
@given(records(), slos)
def test_metric_invariants(recs, slo):
    m = BenchMetrics.compute(recs, slo)
    assert len(recs) == m.completed + m.failed
    if m.duration_s > 0:
        assert m.request_throughput * m.duration_s == pytest.approx(m.completed)
    if m.goodput is not None:
        assert m.goodput <= m.request_throughput
        assert m.slo_met <= m.completed
    assert m.total_token_throughput >= m.output_throughput
    for spread in (m.ttft, m.tpot, m.itl, m.e2e):
        if spread.mean is not None:
            assert spread.p50 <= spread.p90 <= spread.p99
    assert max_overlap(recs) <= len(recs)


# ---------------------------------------------------------------- flags


def test_slo_parse():
    assert Slo(ttft_ms=500.0, tpot_ms=50.0) == Slo.parse("ttft_ms=500, tpot_ms=50")
    assert (Slo(), False) == (Slo.parse(None), Slo.parse("").given)


@pytest.mark.parametrize(("text", "message"), [
    ("ttft=500", "--slo: unknown key 'ttft' (valid: e2e_ms, tpot_ms, ttft_ms)"),
    ("ttft_ms", "--slo: expected key=value, got 'ttft_ms' (valid: e2e_ms, tpot_ms, ttft_ms)"),
    ("ttft_ms=fast", "--slo: ttft_ms must be a positive number of milliseconds, got 'fast'"),
    ("e2e_ms=-1", "--slo: e2e_ms must be a positive number of milliseconds, got '-1'"),
    ("tpot_ms=inf", "--slo: tpot_ms must be a positive number of milliseconds, got 'inf'"),
    ("tpot_ms=5,tpot_ms=6", "--slo: tpot_ms given twice")])
def test_slo_parse_errors_name_the_key(text, message):
    with pytest.raises(ConfigError) as err:
        Slo.parse(text)
    assert message == str(err.value)


def test_rates_parse():
    assert (2.0, 4.0, 0.5, float("inf")) == parse_rates("2,4, 0.5,inf")
    for bad in ("0", "-2", "nan", "fast", "2,,4"):
        with pytest.raises(ConfigError, match="--request-rate: each rate must be a number > 0 or inf"):
            parse_rates(bad)


# ---------------------------------------------------------------- arrivals


def test_fixed_arrivals_are_evenly_spaced_from_zero():
    assert [0.0, 0.25, 0.5, 0.75, 1.0] == arrival_times(5, 4.0, "fixed", random.Random(0))


def test_infinite_rate_sends_everything_at_once():
    assert [0.0] * 4 == arrival_times(4, float("inf"), "poisson", random.Random(0))


def test_poisson_arrivals_are_seeded_and_have_the_asked_mean_rate():
    times = arrival_times(20000, 8.0, "poisson", random.Random(7))
    assert times == arrival_times(20000, 8.0, "poisson", random.Random(7))
    assert times != arrival_times(20000, 8.0, "poisson", random.Random(8))
    # 19999 exponential gaps: the mean's standard error is 0.7% of 1/8; 5% is far outside noise
    assert (len(times) - 1) / times[-1] == pytest.approx(8.0, rel=0.05)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(g > 1 / 8 for g in gaps) / len(gaps) == pytest.approx(0.368, abs=0.02)  # P(gap > mean) = 1/e


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), st.floats(0.01, 1000.0), st.sampled_from(["poisson", "fixed"]), st.integers(0, 99))
def test_arrivals_start_at_zero_and_never_go_back(n, rate, process, seed):
    times = arrival_times(n, rate, process, random.Random(seed))
    assert (n, 0.0) == (len(times), times[0])
    assert times == sorted(times)


def test_bad_arrivals_are_refused():
    with pytest.raises(ConfigError, match="--arrival: unknown arrival process 'gamma' \\(valid: fixed, poisson\\)"):
        arrival_times(3, 1.0, "gamma", random.Random(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--request-rate: must be > 0"):
        arrival_times(3, 0.0, "fixed", random.Random(0))


# ---------------------------------------------------------------- what is sent


def test_request_body_is_a_streamed_completion_with_usage():
    body = request_body("m", BenchRequest((1, 2), 7))
    assert {"model": "m", "prompt": [1, 2], "max_tokens": 7, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}} == body
    assert {**body, "prompt": "hi", "ignore_eos": True} == request_body("m", BenchRequest("hi", 7), ignore_eos=True)


def test_a_workload_file_gives_token_ids_and_output_lengths(tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("seed: 3\nsampling: {temperature: 0.5}\nworkload: {name: synthetic, num_requests: 40, "
                   "prompt_len: {dist: uniform, min: 4, max: 9}, output_len: {dist: fixed, value: 6}, "
                   "arrival: {process: poisson, rate: 1.0}}\n")
    prompts = load_requests(str(cfg), vocab_size=100)
    assert (40, 0.5, {6}) == (len(prompts.requests), prompts.temperature, {r.max_tokens for r in prompts.requests})
    assert all(4 <= len(r.prompt) <= 9 and all(0 <= t < 100 for t in r.prompt) for r in prompts.requests)
    assert prompts == load_requests(str(cfg), vocab_size=100, seed=3)  # the file's seed
    assert prompts != load_requests(str(cfg), vocab_size=100, seed=4)
    assert 5 == len(load_requests(str(cfg), num_requests=5, vocab_size=100).requests)


def test_a_workload_file_gives_the_prompts_asyncbatch_run_gives_it(tmp_path):
    """The same seed and vocabulary make the same requests as the engine's run of that file, so a served run
    and an offline run of one file can be compared request for request."""
    from asyncbatch.core.config import ExperimentConfig
    from asyncbatch.plugins.workloads import Synthetic

    path = str(Path(__file__).resolve().parents[1] / "configs" / "online.yaml")
    cfg = ExperimentConfig.from_yaml(path)
    made = Synthetic(cfg.workload.config, vocab_size=512, seed=cfg.seed).requests(cfg.sampling)
    expected = tuple(BenchRequest(tuple(r.prompt_ids), r.params.max_new_tokens) for r in made)
    prompts = load_requests(path)
    assert (expected, cfg.sampling.temperature) == (prompts.requests, prompts.temperature)


def test_the_default_workload_is_the_synthetic_defaults():
    prompts = load_requests(num_requests=8, seed=1)
    assert 8 == len(prompts.requests)
    assert all(16 <= len(r.prompt) <= 128 and 16 <= r.max_tokens <= 64 for r in prompts.requests)


def test_a_dataset_gives_text_or_ids(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"prompt": "hello", "max_new_tokens": 3},
                                                        {"prompt_ids": [5, 6]}, {"prompt": "x"}]) + "\n")
    prompts = load_requests(dataset=str(data))
    assert (BenchRequest("hello", 3), BenchRequest((5, 6), 16)) == prompts.requests[:2]
    assert (None, 2) == (prompts.requests[0].prompt_tokens, prompts.requests[1].prompt_tokens)
    assert 2 == len(load_requests(dataset=str(data), num_requests=2).requests)
    with pytest.raises(ConfigError, match=f"--num-requests: {data} holds only 3 prompts, 5 asked for"):
        load_requests(dataset=str(data), num_requests=5)


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "hi"}', "needs 'prompt' (non-empty text) or 'prompt_ids'"),
    ('{"prompt_ids": []}', "prompt_ids must be a non-empty list of ints"),
    ('{"prompt": "a", "max_new_tokens": 0}', "max_new_tokens must be an int >= 1, got 0"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{nope", "is not valid JSON")])
def test_bad_dataset_lines_are_named(tmp_path, line, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError) as err:
        load_requests(dataset=str(data))
    assert str(err.value).startswith(f"--dataset: {data}:2")
    assert message in str(err.value)


def test_the_metrics_and_the_command_import_neither_torch_nor_httpx():
    code = ("import sys, asyncbatch, asyncbatch.serve.bench, asyncbatch.serve.bench_metrics\n"
            "from asyncbatch.cli import build_parser; build_parser()\n"
            "print(sorted(m for m in ('torch', 'httpx', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[]" == out.strip()
