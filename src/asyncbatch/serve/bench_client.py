"""The load generator of `asyncbatch bench-serve`: streams completions from an OpenAI-compatible server on a
schedule and records when every chunk arrived.

`bench` calls `fetch_model` once and `run_load` once per request rate. httpx is imported inside the functions
that use it, so importing this module (or `asyncbatch`) never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from ..core.errors import AsyncBatchError, ConfigError
from ..core.types import seeded_random
from .bench_metrics import RequestRecord

Arrival = Literal["poisson", "fixed"]
ERROR_CHARS = 300  # of a server's error body kept per request: enough to read, not a page of HTML per row


@attrs.frozen
class BenchRequest:
    """One completion to send: token ids (synthetic workloads; the server may have no tokenizer) or text."""

    prompt: tuple[int, ...] | str
    max_tokens: int

    @property
    def prompt_tokens(self) -> int | None:
        """Known locally for token ids; for text only the server's `usage` can tell."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


@attrs.frozen
class LoadResult:
    """One rate's run: a record per request (in request order), the run's length and the peak in flight."""

    records: tuple[RequestRecord, ...]
    duration_s: float
    peak_in_flight: int


def arrival_times(n: int, rate: float, process: Arrival, rng: random.Random) -> list[float]:
    """Send offsets in seconds, the first at 0 (as vllm starts): `inf` sends everything at once; `poisson` draws
    exponential gaps of mean 1/rate from `rng`; `fixed` spaces requests exactly 1/rate apart."""
    if process not in ("poisson", "fixed"):
        raise ConfigError("--arrival", f"unknown arrival process {process!r}", ["fixed", "poisson"])
    if not rate > 0:
        raise ConfigError("--request-rate", f"must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate) if process == "poisson" else 1.0 / rate
        out.append(t)
    return out


def request_body(model: str, request: BenchRequest, *, temperature: float = 0.0, ignore_eos: bool = False) -> dict:
    """The JSON of one streamed `/v1/completions` call. `ignore_eos` is a vllm extension, sent only if asked."""
    body: dict[str, Any] = {
        "model": model, "prompt": list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt,
        "max_tokens": request.max_tokens, "temperature": temperature, "stream": True,
        "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def fetch_model(base_url: str, timeout_s: float = 30.0) -> str:
    """The first model `GET /v1/models` lists: the default `--model`. Also proves the server is up before the
    clock starts."""
    import httpx

    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(url, timeout=timeout_s, trust_env=False)
    except httpx.HTTPError as exc:
        raise AsyncBatchError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise AsyncBatchError(f"GET {url} answered HTTP {response.status_code}: {response.text[:ERROR_CHARS]}")
    try:
        models = response.json()["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise AsyncBatchError(f"GET {url} listed no model (pass --model): {response.text[:ERROR_CHARS]}") from exc


def run_load(base_url: str, model: str, requests: Sequence[BenchRequest], *, rate: float, arrival: Arrival = "poisson",
             seed: int = 0, max_concurrency: int | None = None, timeout_s: float = 300.0, temperature: float = 0.0,
             ignore_eos: bool = False) -> LoadResult:
    """Send `requests` on the arrival schedule of `rate` (seeded by `seed`), at most `max_concurrency` in flight,
    and wait for all of them. A request's failure (HTTP error, broken stream, timeout) is recorded in its record;
    it never stops the run."""
    times = arrival_times(len(requests), rate, arrival, seeded_random(seed))
    return asyncio.run(_run(base_url.rstrip("/"), model, requests, times, max_concurrency, timeout_s,
                            temperature, ignore_eos))


async def _run(base_url: str, model: str, requests: Sequence[BenchRequest], times: list[float],
               max_concurrency: int | None, timeout_s: float, temperature: float, ignore_eos: bool) -> LoadResult:
    import httpx

    # One pool as large as the concurrency: a request never waits for a connection after its clock started.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    gate: Any = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    live = [0, 0]  # in flight now, peak
    # trust_env off: a proxy from the environment would put itself into every latency measured
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout, trust_env=False) as client:
        t0 = time.perf_counter()

        async def one(index: int, request: BenchRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, t0 + times[index] - time.perf_counter()))
            scheduled = time.perf_counter() - t0
            async with gate:
                live[0] += 1
                live[1] = max(live)
                try:
                    body = request_body(model, request, temperature=temperature, ignore_eos=ignore_eos)
                    return await _stream(client, body, index, request, scheduled, t0)
                finally:
                    live[0] -= 1

        records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - t0
    return LoadResult(tuple(records), duration, live[1])


async def _stream(client: Any, body: dict, index: int, request: BenchRequest, scheduled: float,
                  t0: float) -> RequestRecord:
    """Send one request and read its server-sent events up to `data: [DONE]`."""
    import httpx

    sent = time.perf_counter() - t0
    chunks: list[float] = []
    usage: dict = {}
    status: int | None = None
    done: float | None = None  # when data: [DONE] arrived

    def record(error: str | None = None, end: float | None = None) -> RequestRecord:
        prompt = usage.get("prompt_tokens", request.prompt_tokens)
        out = usage.get("completion_tokens", len(chunks))
        end = time.perf_counter() - t0 if end is None else end
        return RequestRecord(index, request.max_tokens, prompt, scheduled, sent, end, tuple(chunks), out,
                             error is None, status, error)

    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            status = response.status_code
            if status != 200:
                return record(f"HTTP {status}: {_error_text((await response.aread()).decode(errors='replace'))}")
            async for line in response.aiter_lines():
                if done is not None or not line.startswith("data:"):
                    continue  # after [DONE]; blank separators, `: comments`, `event:` lines
                data = line[5:].strip()
                now = time.perf_counter() - t0
                if data == "[DONE]":
                    # The request ends here, but the loop reads on to the body's end: that keeps the connection
                    # for the next request (a half-read one is closed, and the next would pay a connect in TTFT).
                    done = now
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    return record(f"not JSON in the stream: {data[:ERROR_CHARS]!r}")
                if not isinstance(event, dict):
                    return record(f"not a JSON object in the stream: {data[:ERROR_CHARS]!r}")
                if "error" in event:
                    return record(f"error in the stream: {_error_text(json.dumps(event))}")
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                if _is_token_chunk(event):
                    chunks.append(now)
            if done is None:
                return record("the stream ended before data: [DONE]")
            return record(end=done) if chunks else record("the stream ended without a token", end=done)
    except httpx.HTTPError as exc:
        return record(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _is_token_chunk(event: dict) -> bool:
    """A chunk with a choice counts as a token arrival, even with empty text (a server without a tokenizer, a
    special token), unless it is a pure terminator: no text and a finish reason."""
    choices = event.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return False
    return bool(choices[0].get("text")) or choices[0].get("finish_reason") is None


def _error_text(body: str) -> str:
    """The message of an OpenAI-style `{"error": {"message": ...}}` (or FastAPI's `detail`), else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict) and "message" in err:
            err = err["message"]
        if isinstance(err, str):
            return err[:ERROR_CHARS]
    return " ".join(body.split())[:ERROR_CHARS] or "(empty body)"
