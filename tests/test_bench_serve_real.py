"""bench-serve against the real `asyncbatch serve` app: the tiny model on the cpu runtime, served by uvicorn in a
thread on 127.0.0.1 (a free port), measured through the command line. A few seconds; loopback only."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from asyncbatch import Engine, EngineConfig  # noqa: E402
from asyncbatch.cli import main  # noqa: E402
from asyncbatch.serve import AsyncEngine  # noqa: E402
from asyncbatch.serve.app import build_app  # noqa: E402
from asyncbatch.serve.server import BackgroundServer  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny32):
    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu", "batch": {"max_seqs": 8}}))
    with BackgroundServer(build_app(AsyncEngine(engine), model_name="tiny")) as srv:
        yield srv


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def test_a_synthetic_workload_with_ignore_eos_gets_every_token(server, tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text("workload: {name: synthetic, num_requests: 8, prompt_len: {dist: fixed, value: 8}, "
                   "output_len: {dist: fixed, value: 6}}\n")
    out = tmp_path / "out"
    rc = main(["bench-serve", "--base-url", server.url, "--workload", str(cfg), "--request-rate", "inf",
               "--max-concurrency", "4", "--ignore-eos", "--output", str(out), "--no-plots"])
    assert 0 == rc
    (run,) = _results(out)["runs"]
    assert ("tiny", 8, 0, 4) == (_results(out)["model"], run["completed"], run["failed"], run["peak_in_flight"])
    # usage gives the counts: 6 tokens each (ignore_eos), 8 prompt tokens each
    assert [(6, 8)] * 8 == [(r["output_tokens"], r["prompt_tokens"]) for r in run["requests"]]
    assert all(1 <= len(r["chunk_s"]) <= 6 and r["ttft_ms"] > 0 for r in run["requests"])
    assert 8 * 6 == run["output_tokens"]


def test_requests_the_server_refuses_are_failures(server, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt_ids": [1, 2, 3], "max_new_tokens": 4}, {"prompt_ids": [4, 5], "max_new_tokens": 100000},
            {"prompt": "text, but the tiny model has no tokenizer", "max_new_tokens": 4},
            {"prompt_ids": [6], "max_new_tokens": 2}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert 0 == main(["bench-serve", "--base-url", server.url, "--dataset", str(data), "--output", str(out),
                      "--no-plots"])
    (run,) = _results(out)["runs"]
    assert [(True, 200), (False, 400), (False, 400), (True, 200)] == [(r["success"], r["status"])
                                                                      for r in run["requests"]]
    assert (2, 2) == (run["completed"], run["failed"])
    assert run["requests"][1]["error"].startswith("HTTP 400: This model's maximum context length")
