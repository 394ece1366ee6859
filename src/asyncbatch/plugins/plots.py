"""Sweep plots (PNG): throughput, compute busy fraction, and latency percentiles for online workloads.

matplotlib is an optional dependency (`pip install asyncbatch[plots]`): it is imported only here, only when a
sweep asks for plots, and its absence skips the plots with one message instead of failing the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .experiment import cell_label


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display, never opens a window
    import matplotlib.pyplot as plt

    return plt


def _bars(plt: Any, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
          path: Path, ylim: tuple[float, float] | None = None) -> Path:
    n, k = len(labels), len(series)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 2), 4.5))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(n)]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name if k > 1 else None)
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if k > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(out_dir: Path, keys: Sequence[str], rows: Sequence[dict[str, Any]], *, online: bool,
               echo: Callable[[str], None] = print) -> list[Path]:
    """Write throughput.png, busy.png (if any cell measured it) and latency.png (online workloads only)."""
    try:
        plt = _pyplot()
    except ImportError:
        echo("matplotlib is not installed: skipping plots (pip install 'asyncbatch[plots]')")
        return []
    labels = [cell_label({k: r[k] for k in keys}, "\n") for r in rows]
    written = [_bars(plt, labels, {"tok/s": [r["tok_s"] for r in rows]}, "generated tokens / s",
                     "Throughput per sweep cell", out_dir / "throughput.png")]
    if any(r["busy_fraction"] is not None for r in rows):
        written.append(_bars(plt, labels, {"busy": [r["busy_fraction"] for r in rows]}, "compute busy fraction",
                             "Compute-stream busy fraction per sweep cell", out_dir / "busy.png", (0.0, 1.05)))
    if online:
        series = {name: [r[col] for r in rows] for name, col in (
            ("TTFT p50", "ttft_p50_ms"), ("TTFT p99", "ttft_p99_ms"), ("ITL p50", "itl_p50_ms"),
            ("ITL p99", "itl_p99_ms"))}
        written.append(_bars(plt, labels, series, "ms", "Latency per sweep cell", out_dir / "latency.png"))
    return written
