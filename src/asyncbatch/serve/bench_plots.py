"""Plots of `asyncbatch bench-serve` (PNG): latency CDFs and TTFT/ITL histograms, one line per request rate, and
latency against achieved request throughput when several rates were swept.

`bench.main` calls `plot_bench` after writing the result files. matplotlib stays optional: the figure helpers
of `plugins.plots` import it, and skip the plots with one message when it is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..plugins.plots import _log_scale, _pyplot_or_none, _save
from .bench_metrics import BenchMetrics, RequestRecord

Echo = Callable[[str], None]
LATENCIES = ("TTFT", "TPOT", "ITL", "E2E")


def _latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Each latency of the completed requests, in ms."""
    done = [r for r in records if r.success]
    return {"TTFT": [r.ttft * 1e3 for r in done if r.ttft is not None],
            "TPOT": [r.tpot * 1e3 for r in done if r.tpot is not None],
            "ITL": [x * 1e3 for r in done for x in r.itl],
            "E2E": [r.e2e * 1e3 for r in done]}


def plot_bench(out_dir: Path, runs: Sequence[tuple[str, Sequence[RequestRecord], BenchMetrics]], *,
               echo: Echo = print) -> list[Path]:
    """`runs`: (rate label, records, metrics) per rate. Writes latency_cdf.png, histograms.png and, with two or
    more rates, rate_vs_latency.png; returns the paths written (none without matplotlib)."""
    plt = _pyplot_or_none(echo)
    if plt is None:
        return []
    data = [(label, _latencies(records)) for label, records, _ in runs]
    written = [_cdfs(plt, data, out_dir / "latency_cdf.png"), _histograms(plt, data, out_dir / "histograms.png")]
    if len(runs) > 1:
        written.append(_rates(plt, [(label, m) for label, _, m in runs], out_dir / "rate_vs_latency.png"))
    return written


def _rates(plt: Any, runs: list[tuple[str, BenchMetrics]], path: Path) -> Path:
    """p50 and p99 of each latency against the achieved request throughput (finite even for rate inf), each
    point labelled with the offered rate."""
    runs = sorted(runs, key=lambda r: r[1].request_throughput)
    xs = [m.request_throughput for _, m in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 8.0), squeeze=False)
    for ax, name in zip(axes.flat, LATENCIES):
        every = []
        for q in ("p50", "p99"):
            ys = [math.nan if m.row()[f"{name.lower()}_{q}_ms"] is None else m.row()[f"{name.lower()}_{q}_ms"]
                  for _, m in runs]
            every += ys
            ax.plot(xs, ys, marker="o", label=q)
            if q == "p99":
                for (label, _), x, y in zip(runs, xs, ys):
                    ax.annotate(f"rate {label}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if _log_scale(xs):
            ax.set_xscale("log")
        if _log_scale(every):
            ax.set_yscale("log")
        ax.set_xlabel("achieved request throughput (req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} against throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _cdfs(plt: Any, data: list[tuple[str, dict[str, list[float]]]], path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 8.0), squeeze=False)
    for ax, name in zip(axes.flat, LATENCIES):
        every = []
        for label, lat in data:
            values = sorted(lat[name])
            every += values
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=f"rate {label}")
        if _log_scale(every):
            ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        if len(data) > 1 and every:
            ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _histograms(plt: Any, data: list[tuple[str, dict[str, list[float]]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0), squeeze=False)
    for ax, name in zip(axes.flat, ("TTFT", "ITL")):
        every = [v for _, lat in data for v in lat[name]]
        if every:
            lo, hi = min(every), max(every)
            bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
            for label, lat in data:
                if lat[name]:
                    ax.hist(lat[name], bins=bins, histtype="step", label=f"rate {label}")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("requests" if name == "TTFT" else "gaps")
        ax.set_title(f"{name} histogram")
        ax.grid(alpha=0.3)
        if len(data) > 1 and every:
            ax.legend(fontsize=8)
    return _save(plt, fig, path)
