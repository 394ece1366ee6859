"""Sweep and comparison plots (PNG): throughput, compute busy fraction, latency percentiles (online workloads).

The kind of plot follows the sweep: a numeric key with at least 3 values becomes the x axis of line plots, one
line per combination of the other keys; otherwise one bar per cell (horizontal past `MAX_VERTICAL_BARS` cells,
so labels stay readable). With replicates the plots show group means with 95% confidence error bars. An axis
whose positive data spans two decades or more is logarithmic (symmetric-log where it also holds 0 or a negative
value, so that no point falls off the axis).

matplotlib is an optional dependency (`pip install asyncbatch[plots]`): it is imported only here, only when plots
are asked for, and its absence skips the plots with one message instead of failing the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .report import cell_label
from .sweeps import group_keys

MAX_VERTICAL_BARS = 12
NAN = float("nan")
Echo = Callable[[str], None]
# A panel: (title, column) of a sweep row; (value, error) pairs come from `_points`.
THROUGHPUT = [("tok/s", "tok_s")]
BUSY = [("busy", "busy_fraction")]
LATENCY = [("TTFT p50", "ttft_p50_ms"), ("TTFT p99", "ttft_p99_ms"), ("ITL p50", "itl_p50_ms"),
           ("ITL p99", "itl_p99_ms")]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display, never opens a window
    import matplotlib.pyplot as plt

    return plt


def _pyplot_or_none(echo: Echo) -> Any:
    try:
        return _pyplot()
    except ImportError:
        echo("matplotlib is not installed: skipping plots (pip install 'asyncbatch[plots]')")
        return None


def _num(v: Any) -> float:
    return NAN if v is None else float(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _log_scale(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0 and not math.isnan(v)]
    return len(positive) > 1 and max(positive) / min(positive) >= 100


def _set_scale(set_scale: Callable[..., Any], values: Sequence[float]) -> None:
    """Logarithmic where the positive values span two decades; symmetric-log (linear below the smallest positive
    value) where some value is 0 or negative too, which a log axis would leave out of the plot."""
    if not _log_scale(values):
        return
    real = [v for v in values if not math.isnan(v)]
    if min(real) > 0:
        set_scale("log")
    else:
        set_scale("symlog", linthresh=min(v for v in real if v > 0))


def line_key(keys: Sequence[str], points: Sequence[dict[str, Any]]) -> str | None:
    """The first key whose values are all numbers, with at least 3 distinct ones: the x axis of line plots."""
    for k in keys:
        values = [p[k] for p in points]
        if all(_is_number(v) for v in values) and len(set(values)) >= 3:
            return k
    return None


def _determined(x: str, k: str, points: Sequence[dict[str, Any]]) -> bool:
    """Whether every value of `x` comes with one value of `k` (a zipped key, or a constant)."""
    seen: dict[Any, str] = {}
    return all(seen.setdefault(p[x], repr(p[k])) == repr(p[k]) for p in points)


def _points(keys: Sequence[str], rows: Sequence[dict[str, Any]],
            aggregate: Sequence[dict[str, Any]] | None) -> tuple[list[str], list[dict[str, Any]]]:
    """(keys, points): each point maps keys to values and a column to (value, 95% error or None)."""
    if aggregate:
        by = group_keys(keys)
        return by, [{**{k: a[k] for k in by}, **{c: (_num(a[f"{c}_mean"]), a[f"{c}_ci95"]) for _, c in
                                                 THROUGHPUT + BUSY + LATENCY}} for a in aggregate]
    return list(keys), [{**{k: r[k] for k in keys}, **{c: (_num(r[c]), None) for _, c in THROUGHPUT + BUSY + LATENCY}}
                        for r in rows]


def bars(plt: Any, labels: list[str], series: dict[str, list[tuple[float, float | None]]], ylabel: str,
         title: str, path: Path, ylim: tuple[float, float] | None = None) -> Path:
    """Grouped bars, one group per label; horizontal past MAX_VERTICAL_BARS labels, the figure growing with n."""
    n, k = len(labels), len(series)
    width = 0.8 / k
    horizontal = n > MAX_VERTICAL_BARS
    if horizontal:
        longest = max((len(label) for label in labels), default=0)  # labels sit left of the bars, on one line
        fig, ax = plt.subplots(figsize=(max(9.0, 5.0 + 0.07 * longest), max(3.0, 0.22 * n * max(1.0, 0.7 * k) + 1.5)))
    else:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 2), 4.5))
    for j, (name, pairs) in enumerate(series.items()):
        pos = [i + (j - (k - 1) / 2) * width for i in range(n)]
        vals = [v for v, _ in pairs]
        errs = [e if e is not None else 0.0 for _, e in pairs] if any(e is not None for _, e in pairs) else None
        draw = ax.barh if horizontal else ax.bar
        draw(pos, vals, width, label=name if k > 1 else None, **({"xerr" if horizontal else "yerr": errs,
                                                                  "capsize": 3} if errs else {}))
    if horizontal:
        ax.set_yticks(range(n))
        ax.set_yticklabels([label.replace("\n", ", ") for label in labels], fontsize=8)
        ax.invert_yaxis()  # the first cell on top, as in the tables
        ax.set_xlabel(ylabel)
        if ylim is not None:
            ax.set_xlim(*ylim)
    else:
        ax.set_xticks(range(n))
        ax.set_xticklabels(labels, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
        ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
    ax.set_title(title)
    if k > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    return _save(plt, fig, path)


def lines(plt: Any, x: str, keys: Sequence[str], points: Sequence[dict[str, Any]], panels: list[tuple[str, str]],
          ylabel: str, title: str, path: Path, ylim: tuple[float, float] | None = None) -> Path:
    """One subplot per panel; in each, `panel column` against key `x`, one line per combination of the other
    keys, with error bars where the points have errors. Keys that `x` determines (zipped with it) draw no lines
    of their own: they are named on the x axis."""
    follows = [k for k in keys if k != x and _determined(x, k, points)]
    others = [k for k in keys if k != x and k not in follows]
    varying = [k for k in follows if len({repr(p[k]) for p in points}) > 1]
    xlabel = x + (f" (with {', '.join(varying)})" if varying else "")
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(cell_label({k: p[k] for k in others}) if others else "", []).append(p)
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.0 * rows), squeeze=False)
    for ax, (name, col) in zip(axes.flat, panels):
        ys_all = []
        for label, members in groups.items():
            members = sorted(members, key=lambda p: p[x])
            ys = [p[col][0] for p in members]
            errs = [p[col][1] for p in members]
            ys_all += ys
            ax.errorbar([p[x] for p in members], ys, yerr=[_num(e) for e in errs] if any(e is not None
                        for e in errs) else None, marker="o", capsize=3, label=label or None)
        _set_scale(ax.set_xscale, [_num(p[x]) for p in points])
        if ylim is None:
            _set_scale(ax.set_yscale, ys_all)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name if len(panels) > 1 else title)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if len(panels) > 1:
        fig.suptitle(title)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(out_dir: Path, keys: Sequence[str], rows: Sequence[dict[str, Any]], *, online: bool,
               aggregate: Sequence[dict[str, Any]] | None = None, echo: Echo = print) -> list[Path]:
    """Write throughput.png, busy.png (if any cell measured it) and latency.png (online workloads only)."""
    plt = _pyplot_or_none(echo)
    if plt is None:
        return []
    keys, points = _points(keys, rows, aggregate)
    plots = [("throughput.png", THROUGHPUT, "generated tokens / s", "Throughput", None)]
    if any(not math.isnan(p["busy_fraction"][0]) for p in points):
        plots.append(("busy.png", BUSY, "compute busy fraction", "Compute-stream busy fraction", (0.0, 1.05)))
    if online:
        plots.append(("latency.png", LATENCY, "ms", "Latency", None))
    x = line_key(keys, points)
    written = []
    for name, panels, ylabel, title, ylim in plots:
        if x is not None:
            written.append(lines(plt, x, keys, points, panels, ylabel, f"{title} against {x}", out_dir / name, ylim))
        else:
            labels = [cell_label({k: p[k] for k in keys}, "\n") for p in points]
            series = {n: [p[c] for p in points] for n, c in panels}
            written.append(bars(plt, labels, series, ylabel, f"{title} per sweep cell", out_dir / name, ylim))
    return written


def plot_compare(path: Path, labels: list[str], series: dict[str, list[tuple[float, float | None]]], ylabel: str,
                 title: str, *, echo: Echo = print) -> Path | None:
    """Bars of one metric for two result sets, side by side per matched cell."""
    plt = _pyplot_or_none(echo)
    return None if plt is None else bars(plt, labels, series, ylabel, title, path)
