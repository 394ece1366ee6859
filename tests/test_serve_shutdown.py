"""SIGTERM to `asyncbatch serve` while responses stream, as users run it (a subprocess, both front ends): requests
in flight get `engine.serve.shutdown_timeout_s` to finish; those still running then are cancelled, and every stream
ends with its last event and `data: [DONE]`, never a truncated body; the command exits 0."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _stream(url: str, max_tokens: int, out: dict, key: int) -> None:
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events, tokens = [], 0
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if line != "data: [DONE]" and "choices" in (chunk := json.loads(line[6:])):
                        tokens += len(chunk["choices"][0].get("token_ids") or [])
        out[key] = (response.status_code, tokens, events[-2:])
    except httpx.HTTPError as exc:  # a truncated body: what this test exists to rule out
        out[key] = ("broken", tokens, repr(exc))


def _stream_then_stop(front_end: str, timeout_s: float, max_tokens: int) -> tuple[dict, int, str]:
    results: dict = {}
    with ServeProcess(DEFAULT, f"engine.serve.front_end={front_end}",
                      f"engine.serve.shutdown_timeout_s={timeout_s}") as srv:
        threads = [threading.Thread(target=_stream, args=(srv.url, max_tokens, results, i)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both are streaming
        code = srv.stop()
        for t in threads:
            t.join(60)
    return results, code, srv.text


@pytest.mark.parametrize("front_end", ["process", "thread"])
def test_streams_cut_by_the_shutdown_timeout_end_with_an_error_event_and_done(front_end):
    results, code, log = _stream_then_stop(front_end, 0.2, 2040)  # far more tokens than 0.2 s makes

    assert 0 == code, log
    for status, tokens, last in results.values():
        assert 200 == status, (last, log)
        assert "data: [DONE]" != last[0] and "[DONE]" == last[1]
        assert "shutting_down" == json.loads(last[0])["error"]["code"]
        assert 0 < tokens < 2040
    assert "shutdown: cancelling 2 requests still running after 0.2 s" in log
    assert "timeout graceful shutdown exceeded" not in log


def test_streams_that_end_within_the_timeout_complete_whole():
    results, code, log = _stream_then_stop("process", 60, 600)

    assert 0 == code, log
    for status, tokens, last in results.values():
        assert (200, 600) == (status, tokens), (last, log)
        assert "length" == json.loads(last[0])["choices"][0]["finish_reason"] and "[DONE]" == last[1]
    assert "cancelling" not in log
