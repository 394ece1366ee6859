"""A client that gives up on a whole (non-streamed) response before it is ready.

The handler cancels the collecting task and aborts the request, then asked whether the task was cancelled. A task
asked to cancel is not cancelled until it runs again, so the answer was no, `work.result()` raised
`InvalidStateError`, and every such client logged an internal error with a traceback (100 of them in a run of
300 concurrent clients, a third of which gave up). The request must end quietly: its blocks freed, nothing logged
as an error, and the server goes on serving."""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from asyncbatch import Engine, EngineConfig
from asyncbatch.serve import AsyncEngine
from asyncbatch.serve.app import build_app
from asyncbatch.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def server(tiny32):
    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))
    app = build_app(AsyncEngine(engine))
    with BackgroundServer(app) as srv:
        srv.live = app.state.live
        yield srv


def _wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.live.stats()
        if stats["running"] == 0 and stats["kv_blocks_used"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"still busy after {timeout} s: {server.live.stats()}")


def test_a_client_that_gives_up_on_a_whole_response_logs_no_internal_error(server, caplog):
    body = {"model": "tiny", "prompt": [5] * 40, "max_tokens": 1500, "ignore_eos": True}

    with caplog.at_level(logging.ERROR, logger="asyncbatch"):
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.2))
        _wait_idle(server)
        time.sleep(0.2)  # the handlers have seen the disconnects

    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    out = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30).json()
    assert 2 == len(out["choices"][0]["token_ids"])
