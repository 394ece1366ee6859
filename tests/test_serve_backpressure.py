"""The HTTP server under pressure, on an engine with a single row (one request runs at a time, so the queue can be
filled deterministically): a full queue answers 429 and the server goes on serving; a graceful shutdown finishes
every request in flight, queued ones included, and loses no response.

The tiny model decodes a token in a fraction of a millisecond; an observer that sleeps in every step stands in for a
slower device, so that a running request holds its row for as long as the test needs.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.serve import AsyncEngine, ServeObserver
from asyncbatch.serve.app import build_app
from asyncbatch.serve.server import BackgroundServer

STEP_S = 0.005


class SlowDevice(ServeObserver):
    def step(self, stats) -> None:
        time.sleep(STEP_S)


SHORT = {"model": "tiny", "prompt": [3, 4], "max_tokens": 2, "temperature": 0}
LONG = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def one_row(tiny64):
    return Engine.from_model(tiny64, EngineConfig.from_dict({"runtime": "cpu", "batch": {"max_seqs": 1},
                                                             "serve": {"max_waiting": 2}}))


def _until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _stream(url: str, body: dict) -> tuple[int, list[int], list[str]]:
    """Status, streamed token ids, and the finish reasons and [DONE] seen."""
    tokens, ends = [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                ends.append("[DONE]")
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                if choice["finish_reason"]:
                    ends.append(choice["finish_reason"])
    return r.status_code, tokens, ends


def test_a_full_queue_answers_429_and_the_server_keeps_serving(one_row):
    app = build_app(AsyncEngine(one_row, observers=[SlowDevice()]))
    live = app.state.live
    with BackgroundServer(app) as srv, ThreadPoolExecutor(2) as pool:
        url = srv.url + "/v1/completions"
        with httpx.stream("POST", url, json=LONG) as running:
            lines = running.iter_lines()  # kept: closing this iterator would close the connection
            next(line for line in lines if line.startswith("data: "))  # it holds the only row
            queued = [pool.submit(httpx.post, url, json=SHORT, timeout=60) for _ in range(2)]
            _until(lambda: live.stats()["waiting"] == 2, "two queued requests")
            full = httpx.post(url, json=SHORT)
        # leaving the block closed the running stream: it is cancelled, and the queued requests get the row
        served = [f.result(timeout=60).status_code for f in queued]
        after = httpx.post(url, json=SHORT)

    err = full.json()["error"]
    assert (429, "rate_limit_error", "queue_full", "1") == (full.status_code, err["type"], err["code"],
                                                            full.headers["retry-after"])
    assert "2 requests already wait for a row (engine.serve.max_waiting=2)" in err["message"]
    assert [200, 200, 200] == [*served, after.status_code]


def test_a_graceful_shutdown_loses_no_response(one_row):
    """A long request runs (100 steps, at least half a second), five more wait for its row; the server is stopped: it
    closes its listener, and all six responses arrive whole."""
    app = build_app(AsyncEngine(one_row, max_waiting=16, observers=[SlowDevice()]))
    live = app.state.live
    srv = BackgroundServer(app).start()
    long = {"model": "tiny", "prompt": [1, 2], "max_tokens": 100, "ignore_eos": True, "temperature": 0,
            "stream": True}
    whole = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 30, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(_stream, srv.url, long)
        _until(lambda: live.stats()["running"] == 1, "the long request to run")
        wholes = [pool.submit(httpx.post, srv.url + "/v1/completions", json=whole, timeout=60) for _ in range(4)]
        streams = [pool.submit(_stream, srv.url, {**whole, "stream": True})]
        _until(lambda: live.stats()["waiting"] == 5, "five queued requests")
        srv.stop()  # graceful: returns once the server is down
        answers = [f.result(timeout=60) for f in wholes]
        streamed = [f.result(timeout=60) for f in [first, *streams]]

    ref = answers[0].json()["choices"][0]["token_ids"]
    assert 30 == len(ref)
    assert [(200, ref, "length")] * 4 == [(a.status_code, a.json()["choices"][0]["token_ids"],
                                           a.json()["choices"][0]["finish_reason"]) for a in answers]
    assert [(200, 100, ["length", "[DONE]"]), (200, 30, ["length", "[DONE]"])] == [
        (status, len(tokens), ends) for status, tokens, ends in streamed]
    assert ref == streamed[1][1]
    assert not live.accepting
    with pytest.raises(httpx.ConnectError):
        httpx.post(srv.url + "/v1/completions", json=whole)
