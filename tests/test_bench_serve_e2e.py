"""bench-serve against a real HTTP server on 127.0.0.1: a small Starlette app (a test fixture, not product code)
that streams completions as server-sent events with known delays, so the recorded TTFT and ITL can be checked
against them. The model name picks a behaviour: `plain`, `nousage` (no usage chunk), `double` (two tokens per
chunk), `broken` (the stream stops before [DONE]); max_tokens > 50 answers 400 and the prompt [429] answers 429.

Timing bounds are one-sided where sleeps guarantee them (a token cannot come earlier than the server sent it)
and generous the other way, for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import csv
import json
import socket
import threading
import time

import pytest

pytest.importorskip("httpx")
starlette = pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from asyncbatch.cli import main  # noqa: E402
from asyncbatch.serve.bench_client import BenchRequest, fetch_model, run_load  # noqa: E402
from asyncbatch.serve.bench_metrics import BenchMetrics, Slo, max_overlap  # noqa: E402

TTFT_S = 0.15
ITL_S = 0.04
EPS = 0.003  # timer granularity between the server's sleep and the client's clock
SLACK = 0.6  # how late a loaded machine may deliver


class FixtureServer:
    """The app and its counters; `peak` is the most requests the server held at once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.ports: set[int] = set()  # client ports seen: one per connection
        self.app = Starlette(routes=[Route("/v1/models", self.models), Route("/v1/completions", self.complete,
                                                                               methods=["POST"])])

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [{"id": "fixture-model", "object": "model"}]})

    async def complete(self, request):
        body = await request.json()
        self.ports.add(request.client.port)
        if body["max_tokens"] > 50:
            return JSONResponse({"error": {"message": "max_tokens too large", "type": "invalid_request"}}, 400)
        if body["prompt"] == [429]:
            return JSONResponse({"error": {"message": "rate limited"}}, 429)
        self.live += 1
        self.peak = max(self.peak, self.live)
        return StreamingResponse(self.stream(body), media_type="text/event-stream")

    async def stream(self, body):
        model, n = body["model"], body["max_tokens"]
        per_chunk = 2 if model == "double" else 1
        chunks = -(-n // per_chunk)
        try:
            await asyncio.sleep(TTFT_S)
            for i in range(chunks):
                if i:
                    await asyncio.sleep(ITL_S)
                last = i == chunks - 1
                if model == "broken" and last:
                    return
                yield _event({"choices": [{"index": 0, "text": " t" * per_chunk,
                                           "finish_reason": "length" if last else None}]})
            if model != "nousage" and body.get("stream_options", {}).get("include_usage"):
                prompt = len(body["prompt"]) if isinstance(body["prompt"], list) else 7
                yield _event({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n}})
        finally:
            self.live -= 1  # before [DONE]: a client cannot start its next request while this one still counts
        yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


@pytest.fixture(scope="module")
def server():
    fixture = FixtureServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(fixture.app, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the fixture server did not start"
    fixture.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield fixture
    srv.should_exit = True
    thread.join(10)
    sock.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


def test_recorded_ttft_and_itl_match_the_servers_delays(server):
    load = run_load(server.url, "plain", [BenchRequest((1, 2, 3), 5)] * 4, rate=float("inf"))
    assert [(True, 5, 5, 3)] * 4 == [(r.success, r.output_tokens, len(r.chunk_s), r.prompt_tokens)
                                     for r in load.records]
    for r in load.records:
        assert TTFT_S - EPS <= r.ttft <= TTFT_S + SLACK
        assert TTFT_S + 4 * ITL_S - EPS <= r.ttft + sum(r.itl) <= r.e2e <= TTFT_S + 4 * ITL_S + SLACK
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4)
    # One gap can be short (a late chunk shortens the gap after it), so the median over all 16 is checked
    gaps = sorted(x for r in load.records for x in r.itl)
    assert ITL_S / 2 <= (gaps[7] + gaps[8]) / 2 <= ITL_S + SLACK / 2
    m = BenchMetrics.compute(load.records, Slo(ttft_ms=(TTFT_S + SLACK) * 1e3), load.duration_s)
    assert (4, 0, 20, 4) == (m.completed, m.failed, m.output_tokens, m.slo_met)
    assert TTFT_S - EPS <= m.ttft.p50 <= m.ttft.p99 <= TTFT_S + SLACK


def test_usage_counts_tokens_when_a_chunk_carries_several(server):
    (r,) = run_load(server.url, "double", [BenchRequest((1,), 6)], rate=1.0).records
    assert (True, 3, 6) == (r.success, len(r.chunk_s), r.output_tokens)
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 5)


def test_without_usage_the_chunks_are_counted(server):
    (r,) = run_load(server.url, "nousage", [BenchRequest((1, 2), 4)], rate=1.0).records
    assert (True, 4, 4, 2) == (r.success, len(r.chunk_s), r.output_tokens, r.prompt_tokens)
    (t,) = run_load(server.url, "plain", [BenchRequest("text prompt", 2)], rate=1.0).records
    assert (True, 7) == (t.success, t.prompt_tokens)  # text: only the server's usage knows the prompt's length


def test_http_errors_are_failures_not_crashes(server):
    reqs = [BenchRequest((1,), 2), BenchRequest((1,), 99), BenchRequest((429,), 2), BenchRequest((2,), 2)]
    load = run_load(server.url, "plain", reqs, rate=float("inf"))
    assert [(True, 200, None), (False, 400, "HTTP 400: max_tokens too large"),
            (False, 429, "HTTP 429: rate limited"), (True, 200, None)] == [
        (r.success, r.status, r.error) for r in load.records]
    m = BenchMetrics.compute(load.records)
    assert (2, 2, {"HTTP 400: max_tokens too large": 1, "HTTP 429: rate limited": 1}) == (
        m.completed, m.failed, m.errors)


def test_a_stream_cut_before_done_is_a_failure(server):
    (r,) = run_load(server.url, "broken", [BenchRequest((1,), 3)], rate=1.0).records
    assert (False, 200, "the stream ended before data: [DONE]", 2) == (r.success, r.status, r.error,
                                                                         len(r.chunk_s))


def test_an_unreachable_server_fails_every_request():
    load = run_load(_closed_port_url(), "m", [BenchRequest((1,), 2)] * 3, rate=float("inf"), timeout_s=5.0)
    assert [(False, None, "ConnectError")] * 3 == [(r.success, r.status, (r.error or "").split(":")[0])
                                                   for r in load.records]


def test_max_concurrency_is_never_exceeded(server):
    server.peak = 0
    load = run_load(server.url, "plain", [BenchRequest((1,), 3)] * 10, rate=float("inf"), max_concurrency=3)
    assert all(r.success for r in load.records)
    assert 3 == load.peak_in_flight  # ten released at once: the gate is the only limit
    assert max_overlap(load.records) <= 3
    assert 1 <= server.peak <= 3


def test_one_slot_reuses_one_connection(server):
    """Every stream is read to its end, so its connection goes back to the pool: no request after the first
    pays for a connect inside its TTFT."""
    server.ports.clear()
    load = run_load(server.url, "plain", [BenchRequest((1,), 2)] * 4, rate=float("inf"), max_concurrency=1)
    assert (4, 1) == (sum(r.success for r in load.records), len(server.ports))


def test_requests_leave_on_the_fixed_schedule(server):
    load = run_load(server.url, "plain", [BenchRequest((1,), 1)] * 5, rate=10.0, arrival="fixed")
    for i, r in enumerate(load.records):
        assert i * 0.1 - EPS <= r.scheduled_s <= r.sent_s <= i * 0.1 + SLACK


def test_fetch_model_names_the_first_listed_model(server):
    assert "fixture-model" == fetch_model(server.url)


def test_the_command_writes_a_sweep(server, tmp_path, capsys):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("workload: {name: synthetic, num_requests: 50, prompt_len: {dist: fixed, value: 3}, "
                   "output_len: {dist: uniform, min: 2, max: 4}}\n")
    out = tmp_path / "out"
    rc = main(["bench-serve", "--base-url", server.url, "--workload", str(cfg), "--num-requests", "6",
               "--request-rate", "50,inf", "--arrival", "fixed", "--slo", "ttft_ms=60000", "--output", str(out),
               "--max-concurrency", "4"])
    printed = capsys.readouterr().out
    assert 0 == rc
    assert "rate 50" in printed and "rate inf" in printed and "goodput req/s (ttft_ms<=60000)" in printed
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [("50", "6", "0"), ("inf", "6", "0")] == [(r["request_rate"], r["completed"], r["failed"]) for r in rows]
    assert all(float(r["goodput"]) == float(r["request_throughput"]) for r in rows)
    assert all(int(r["peak_in_flight"]) <= 4 for r in rows)
    data = json.loads((out / "results.json").read_text())
    assert ("fixture-model", ["50", "inf"]) == (data["model"], [run["request_rate"] for run in data["runs"]])
    first = data["runs"][0]["requests"][0]
    assert first["output_tokens"] == len(first["chunk_s"]) >= 2 and first["ttft_ms"] >= TTFT_S * 1e3 - 3
    with (out / "requests.csv").open() as fh:
        assert 12 == len(list(csv.DictReader(fh)))
    pytest.importorskip("matplotlib")
    assert all((out / name).stat().st_size > 0 for name in ("latency_cdf.png", "histograms.png",
                                                              "rate_vs_latency.png"))


def test_the_command_counts_failures_and_fails_when_nothing_completed(server, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "max_new_tokens": 99}\n' * 2)
    rc = main(["bench-serve", "--base-url", server.url, "--dataset", str(data), "--output", str(tmp_path / "o"),
               "--no-plots"])
    captured = capsys.readouterr()
    assert 1 == rc
    assert "no request completed (first error: HTTP 400: max_tokens too large)" in captured.err
    assert "2 x HTTP 400: max_tokens too large" in captured.out
    assert (tmp_path / "o" / "results.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--slo", "ttft=5"], "config error: --slo: unknown key 'ttft' (valid: e2e_ms, tpot_ms, ttft_ms)"),
    (["--request-rate", "fast"], "config error: --request-rate: each rate must be a number > 0 or inf, got 'fast'"),
    (["--max-concurrency", "0"], "config error: --max-concurrency: must be >= 1, got 0"),
    (["--dataset", "/nonexistent.jsonl"], "config error: --dataset: no such file: /nonexistent.jsonl")])
def test_bad_flags_fail_before_any_request(args, message, capsys):
    assert 2 == main(["bench-serve", "--base-url", _closed_port_url(), *args])
    assert message in capsys.readouterr().err


def test_an_unreachable_server_is_one_clear_error(tmp_path, capsys):
    url = _closed_port_url()
    assert 1 == main(["bench-serve", "--base-url", url, "--output", str(tmp_path / "o")])
    assert f"asyncbatch: error: cannot reach {url}/v1/models: ConnectError" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
