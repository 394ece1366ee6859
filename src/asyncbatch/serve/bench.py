"""`asyncbatch bench-serve`: measure an OpenAI-compatible completions server the way `vllm bench serve` does.

`cli.py` takes the flags from `bench_args`; `cli_commands.cmd_bench_serve` calls `main` when the command runs.
`main` checks every flag and the prompts first, then asks the server for its model, runs each request rate in
turn (same prompts, same seeded schedule scaled to the rate), prints one table column per rate and writes
`results.json` (options, metrics, every request with every chunk's arrival time), `summary.csv` (one row per
rate), `requests.csv` (one row per request), `summary.txt` and plots.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from ..core.errors import ConfigError
from ..plugins.report import checked_out_dir, fmt, format_table, make_dir, stamped_dir, write_csv, write_json
from .bench_client import LoadResult, fetch_model, run_load
from .bench_metrics import BenchMetrics, RequestRecord, Slo
from .bench_workload import Prompts, load_requests

log = logging.getLogger("asyncbatch")
SPREAD_STATS = ("mean", "p50", "p90", "p99")


@attrs.frozen
class BenchOptions:
    """Every flag, checked: built by `from_args` before anything is read or sent."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    rates: tuple[float, ...] = (math.inf,)
    arrival: str = "poisson"
    max_concurrency: int | None = None
    num_requests: int | None = None
    workload: str | None = None
    dataset: str | None = None
    seed: int | None = None
    slo: Slo = Slo()
    output: str | None = None
    force: bool = False
    plots: bool = True
    ignore_eos: bool = False
    vocab_size: int = 512
    timeout_s: float = 300.0

    def __attrs_post_init__(self) -> None:
        for flag, value in (("--max-concurrency", self.max_concurrency), ("--num-requests", self.num_requests),
                            ("--vocab-size", self.vocab_size)):
            if value is not None and value < 1:
                raise ConfigError(flag, f"must be >= 1, got {value}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError("--timeout", f"must be a positive number of seconds, got {self.timeout_s}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("--base-url", f"expected http://host:port or https://..., got {self.base_url!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        return cls(base_url=args.base_url, model=args.model, rates=parse_rates(args.request_rate),
                   arrival=args.arrival, max_concurrency=args.max_concurrency, num_requests=args.num_requests,
                   workload=args.workload, dataset=args.dataset, seed=args.seed, slo=Slo.parse(args.slo),
                   output=args.output, force=args.force, plots=args.plots, ignore_eos=args.ignore_eos,
                   vocab_size=args.vocab_size, timeout_s=args.timeout)


def parse_rates(text: str) -> tuple[float, ...]:
    """`2,4,8,inf` -> (2.0, 4.0, 8.0, inf): each a positive number or inf."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not rate > 0:  # NaN fails too
            raise ConfigError("--request-rate", f"each rate must be a number > 0 or inf, got {item.strip()!r}")
        rates.append(rate)
    return tuple(rates)


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


@attrs.frozen
class RateRun:
    """One request rate's run and its numbers."""

    rate: float
    load: LoadResult
    metrics: BenchMetrics


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run `asyncbatch bench-serve`; exit 0, or 1 when not one request completed (results are written anyway)."""
    opts = BenchOptions.from_args(args)
    prompts = load_requests(opts.workload, opts.dataset, num_requests=opts.num_requests, seed=opts.seed,
                            vocab_size=opts.vocab_size)
    out = stamped_dir("results", "bench-serve", "--output") if opts.output is None else checked_out_dir(
        opts.output, force=opts.force, key="--output")
    model = opts.model or fetch_model(opts.base_url)
    make_dir(out, "--output")  # before the runs: a directory that cannot be made must not cost their results
    runs = [run_rate(opts, prompts, model, rate) for rate in opts.rates]
    table = summary_text(opts, model, runs)
    print(table)
    written = write_results(out, opts, prompts, model, runs, argv)
    if opts.plots:
        from .bench_plots import plot_bench

        written += plot_bench(out, [(rate_label(r.rate), r.load.records, r.metrics) for r in runs])
    print("written: " + ", ".join(str(p) for p in written))
    if not any(r.metrics.completed for r in runs):
        first = next(iter(runs[0].metrics.errors), "unknown error")
        print(f"asyncbatch: error: no request completed (first error: {first})", file=sys.stderr)
        return 1
    return 0


def run_rate(opts: BenchOptions, prompts: Prompts, model: str, rate: float) -> RateRun:
    log.info("bench-serve: %d requests at rate %s -> %s", len(prompts.requests), rate_label(rate), opts.base_url)
    load = run_load(opts.base_url, model, prompts.requests, rate=rate, arrival=opts.arrival,  # type: ignore[arg-type]
                    seed=prompts.seed, max_concurrency=opts.max_concurrency,
                    timeout_s=opts.timeout_s, temperature=prompts.temperature, ignore_eos=opts.ignore_eos)
    metrics = BenchMetrics.compute(load.records, opts.slo, load.duration_s)
    log.info("  %d completed, %d failed in %.2f s", metrics.completed, metrics.failed, metrics.duration_s)
    return RateRun(rate, load, metrics)


def summary_row(run: RateRun, opts: BenchOptions) -> dict:
    """One summary.csv row: the rate, the metrics (latencies in ms), and what bounded the run."""
    return {"request_rate": rate_label(run.rate), "arrival": opts.arrival, "max_concurrency": opts.max_concurrency,
            "peak_in_flight": run.load.peak_in_flight, **run.metrics.row()}


def summary_text(opts: BenchOptions, model: str, runs: Sequence[RateRun]) -> str:
    """The printed table: one column per request rate."""
    rows = [summary_row(r, opts) for r in runs]

    def line(name: str, key: str, digits: int = 2) -> tuple:
        return (name, *(fmt(r[key], digits) if isinstance(r[key], float) else fmt(r[key]) for r in rows))

    table = [line("completed", "completed"), line("failed", "failed"), line("duration s", "duration_s"),
             line("request throughput req/s", "request_throughput"),
             line("output throughput tok/s", "output_throughput"),
             line("total token throughput tok/s", "total_token_throughput")]
    if opts.slo.given:
        table.append(line("goodput req/s (" + ", ".join(
            f"{k}<={getattr(opts.slo, k):g}" for k in ("ttft_ms", "tpot_ms", "e2e_ms")
            if getattr(opts.slo, k) is not None) + ")", "goodput"))
    for name in ("ttft", "tpot", "itl", "e2e"):
        table.append((f"{name.upper()} ms mean / p50 / p90 / p99",
                      *(" / ".join(fmt(r[f"{name}_{s}_ms"]) for s in SPREAD_STATS) for r in rows)))
    table.append(line("peak in flight", "peak_in_flight"))
    head = f"bench-serve: {opts.base_url} model {model!r}, {opts.arrival} arrivals"
    text = head + "\n" + format_table(("metric", *(f"rate {rate_label(r.rate)}" for r in runs)), table)
    for r in runs:
        for message, count in list(r.metrics.errors.items())[:3]:
            text += f"\nrate {rate_label(r.rate)}: {count} x {message}"
    return text


def write_results(out: Path, opts: BenchOptions, prompts: Prompts, model: str, runs: Sequence[RateRun],
                  argv: Sequence[str]) -> list[Path]:
    """results.json, summary.csv, requests.csv and summary.txt under `out`; returns their paths."""
    from .. import __version__

    rows = [summary_row(r, opts) for r in runs]
    options = {**attrs.asdict(opts), "rates": [rate_label(r) for r in opts.rates]}
    data = {"tool": "asyncbatch bench-serve", "version": __version__, "argv": list(argv),
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "base_url": opts.base_url, "model": model, "prompts": prompts.source, "seed": prompts.seed,
            "options": options,
            "runs": [{**row, "metrics": attrs.asdict(r.metrics), "requests": [_request(x) for x in r.load.records]}
                     for row, r in zip(rows, runs)]}
    paths = [out / "results.json", out / "summary.csv", out / "requests.csv", out / "summary.txt"]
    write_json(paths[0], data)
    write_csv(paths[1], list(rows[0]), rows)
    per_request = [{"request_rate": rate_label(r.rate), **{k: v for k, v in _request(x).items() if k != "chunk_s"},
                    "chunks": len(x.chunk_s)} for r in runs for x in r.load.records]
    write_csv(paths[2], list(per_request[0]) if per_request else ["request_rate"], per_request)
    paths[3].write_text(summary_text(opts, model, runs) + "\n")
    return paths


def _request(record: RequestRecord) -> dict:
    """A record with its derived latencies in ms; times rounded to microseconds (far below any latency here)."""
    d = attrs.asdict(record)
    for k in ("scheduled_s", "sent_s", "end_s"):
        d[k] = round(d[k], 6)
    d["chunk_s"] = [round(t, 6) for t in d["chunk_s"]]
    for k in ("ttft", "tpot", "e2e"):
        value = getattr(record, k)
        d[f"{k}_ms"] = None if value is None else round(value * 1e3, 3)
    itl = record.itl
    d["itl_mean_ms"] = round(sum(itl) / len(itl) * 1e3, 3) if itl else None
    return d

