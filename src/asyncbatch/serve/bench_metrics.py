"""The numbers of `asyncbatch bench-serve`: per-request records in, latency spreads, throughputs and goodput out.

Pure and light: no torch, no httpx, no event loop. `bench_client` builds the `RequestRecord`s while requests run,
`bench` calls `BenchMetrics.compute` once per request rate and writes `BenchMetrics.row()` to summary.csv. The
definitions follow `vllm bench serve`, so that numbers from either tool can sit in one table (docs/bench-serve.md
states each one exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from ..core.errors import ConfigError
from ..core.stats import percentile

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
QUANTILES = (50, 90, 99)


@attrs.frozen
class RequestRecord:
    """One request as the client saw it. Times in seconds since the benchmark started (its first scheduled send).

    `scheduled_s` is when the arrival schedule released it, `sent_s` when it got a concurrency slot and was sent
    (latencies count from here, as vllm's do); `chunk_s` holds the arrival time of every streamed chunk that
    carried a choice, the first of them being the first token. `output_tokens` comes from the server's `usage`
    when it sent one, else it is the number of such chunks. A failed request keeps what it got before failing.
    """

    index: int
    max_tokens: int
    prompt_tokens: int | None
    scheduled_s: float
    sent_s: float
    end_s: float
    chunk_s: tuple[float, ...] = ()
    output_tokens: int = 0
    success: bool = True
    status: int | None = None  # the HTTP status; None when no response came (connection refused, timeout)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_s[0] - self.sent_s if self.chunk_s else None

    @property
    def e2e(self) -> float:
        return self.end_s - self.sent_s

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive chunks (a chunk holding several tokens counts once, as in vllm)."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1); None under 2 tokens."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@attrs.frozen
class Slo:
    """Service-level objectives in milliseconds; None: not constrained. `parse` reads the `--slo` flag."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def given(self) -> bool:
        return any(getattr(self, k) is not None for k in SLO_KEYS)

    @classmethod
    def parse(cls, text: str | None) -> Slo:
        """`ttft_ms=500,tpot_ms=50` -> Slo. Called while the CLI validates its flags, before any request."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for item in text.split(","):
            key, sep, raw = item.strip().partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError("--slo", f"expected key=value, got {item.strip()!r}", list(SLO_KEYS))
            if key not in SLO_KEYS:
                raise ConfigError("--slo", f"unknown key {key!r}", list(SLO_KEYS))
            if key in values:
                raise ConfigError("--slo", f"{key} given twice")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise ConfigError("--slo", f"{key} must be a positive number of milliseconds, got {raw.strip()!r}")
            values[key] = value
        return cls(**values)

    def met(self, record: RequestRecord) -> bool:
        """Whether a completed request meets every objective. A request of one token has no TPOT and so cannot
        miss the TPOT objective (vllm counts its TPOT as 0)."""
        if not record.success:
            return False
        checks = ((self.ttft_ms, record.ttft), (self.tpot_ms, record.tpot), (self.e2e_ms, record.e2e))
        return all(limit is None or value is None or value * 1e3 <= limit for limit, value in checks)


@attrs.frozen
class Spread:
    """Mean and percentiles of one latency, in seconds; all None when nothing was measured."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls()
        # core.stats.percentile: linear interpolation between nearest ranks, numpy's default (and vllm's)
        return cls(sum(values) / len(values), *(percentile(values, q) for q in QUANTILES))


@attrs.frozen
class BenchMetrics:
    """What one request rate achieved. Throughputs per second of `duration_s`; latencies over completed requests.

    `goodput` (completed requests meeting every SLO per second) is None when no SLO was given."""

    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Spread
    tpot: Spread
    itl: Spread
    e2e: Spread
    slo_met: int | None = None
    goodput: float | None = None
    errors: dict = attrs.Factory(dict)  # error message -> count, most frequent first

    @classmethod
    def compute(cls, records: Sequence[RequestRecord], slo: Slo = Slo(), duration_s: float | None = None
                ) -> BenchMetrics:
        """Called by `bench` after each rate's run. `duration_s` defaults to the last request's end: the run
        starts at 0, when the schedule released its first request."""
        done = [r for r in records if r.success]
        duration = duration_s if duration_s is not None else max((r.end_s for r in records), default=0.0)
        per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
        inputs = sum(r.prompt_tokens or 0 for r in done)
        outputs = sum(r.output_tokens for r in done)
        errors: dict[str, int] = {}
        for r in records:
            if not r.success:
                errors[r.error or "unknown error"] = errors.get(r.error or "unknown error", 0) + 1
        met = sum(slo.met(r) for r in done) if slo.given else None
        return cls(
            completed=len(done), failed=len(records) - len(done), duration_s=duration, input_tokens=inputs,
            output_tokens=outputs, request_throughput=per_s(len(done)), output_throughput=per_s(outputs),
            total_token_throughput=per_s(inputs + outputs),
            ttft=Spread.of([r.ttft for r in done if r.ttft is not None]),
            tpot=Spread.of([r.tpot for r in done if r.tpot is not None]),
            itl=Spread.of([x for r in done for x in r.itl]),
            e2e=Spread.of([r.e2e for r in done]),
            slo_met=met, goodput=None if met is None else per_s(met),
            errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])))

    def row(self) -> dict:
        """Flat, latencies in ms: one summary.csv row (the caller adds the rate) and the printed table's column."""
        out: dict = {k: getattr(self, k) for k in (
            "completed", "failed", "duration_s", "input_tokens", "output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "goodput", "slo_met")}
        for name in ("ttft", "tpot", "itl", "e2e"):
            spread: Spread = getattr(self, name)
            for stat in ("mean", *(f"p{q}" for q in QUANTILES)):
                value = getattr(spread, stat)
                out[f"{name}_{stat}_ms"] = None if value is None else value * 1e3
        return out


def max_overlap(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once (sent, not yet ended): checks the `--max-concurrency` bound."""
    events = sorted([(r.sent_s, 1) for r in records] + [(r.end_s, -1) for r in records])  # ends sort first
    peak = live = 0
    for _, step in events:
        live += step
        peak = max(peak, live)
    return peak
