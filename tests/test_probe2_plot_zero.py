"""A numeric sweep key whose values span decades and start at 0 (`cpu_prep_ms: [0, 0.1, 1, 10, 100]`) keeps
every cell on the line plot: a log axis would leave the 0 cell out, so the axis is symmetric-log."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from asyncbatch.plugins import plots  # noqa: E402

KEY = "engine.runtime.cost.cpu_prep_ms"


def _row(x, tok_s):
    return {KEY: x, "tok_s": tok_s, "busy_fraction": None, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0,
            "itl_p50_ms": 1.0, "itl_p99_ms": 1.0}


def _plotted(tmp_path, monkeypatch, rows):
    seen = []
    save = plots._save

    def grab(plt, fig, path):
        ax = fig.axes[0]
        xs = [x for line in ax.get_lines() for x in line.get_xdata()]
        lo, hi = ax.get_xlim()
        seen.append((ax.get_xscale(), sorted(x for x in xs if lo <= x <= hi)))
        return save(plt, fig, path)

    monkeypatch.setattr(plots, "_save", grab)
    plots.plot_sweep(tmp_path, [KEY], rows, online=False, echo=lambda _: None)
    return seen


def test_a_zero_value_stays_on_an_axis_spanning_decades(tmp_path, monkeypatch):
    rows = [_row(x, t) for x, t in [(0, 300.0), (0.1, 290.0), (1, 280.0), (10, 200.0), (100, 30.0)]]
    assert [("symlog", [0, 0.1, 1, 10, 100])] == _plotted(tmp_path, monkeypatch, rows)


def test_positive_values_spanning_decades_keep_a_log_axis(tmp_path, monkeypatch):
    rows = [_row(x, 10.0) for x in (1, 8, 64, 512)]
    assert [("log", [1, 8, 64, 512])] == _plotted(tmp_path, monkeypatch, rows)
