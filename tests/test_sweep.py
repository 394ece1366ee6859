"""Sweeps through the CLI: the comparison table, sweep.csv/json (one row per cell), plots, model reuse.

CPU only; the shipped sweep config runs as is (it must finish well under a minute on a small CPU).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml

from asyncbatch.cli import main
from asyncbatch.core.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweep-buffers.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_shipped_sweep_config(tmp_path, capsys):
    cfg = ExperimentConfig.from_yaml(SWEEP)
    keys = list(cfg.sweep)
    cells = cfg.sweep_cells()
    assert len(keys) >= 2 and len(cells) >= 4
    start = time.perf_counter()
    code = main(["--log-level", "warning", "run", str(SWEEP), "--out", str(tmp_path), "--no-progress"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0
    assert elapsed < 60
    rows = _csv_rows(tmp_path / "sweep.csv")
    assert len(rows) == len(cells)
    assert list(rows[0])[: len(keys)] == keys
    # Rows follow the cell order, and every swept value shows up in its row.
    for row, (assignment, _) in zip(rows, cells, strict=True):
        for k, v in assignment.items():
            assert row[k] == str(v)
        assert float(row["tok_s"]) > 0 and int(row["steps"]) > 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["keys"] == keys and len(data["rows"]) == len(cells) and data["online"] is False
    # The comparison table: a header with the short key names, one line per cell.
    lines = out.splitlines()
    header = next(i for i, x in enumerate(lines) if x.split()[:2] == [k.split(".")[-1] for k in keys])
    assert len([x for x in lines[header + 2:] if x and x.split()[0] in {"single", "double"}]) == len(cells)
    assert _is_png(tmp_path / "throughput.png")
    assert not (tmp_path / "busy.png").exists()  # the cpu runtime cannot measure device busy time
    assert not (tmp_path / "latency.png").exists()  # offline workload
    for i, (assignment, cell) in enumerate(cells):
        (cell_dir,) = (tmp_path / "cells").glob(f"{i:02d}-*")
        res = json.loads((cell_dir / "results.json").read_text())
        assert res["assignment"] == assignment
        assert res["summary"]["generated_tokens"] == sum(o["output_tokens"] for o in res["outputs"])
        assert ExperimentConfig.from_yaml(cell_dir / "config.yaml") == cell
    # The top-level config keeps the sweep, so rerunning it reruns the whole sweep.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sweep"] == cfg.sweep
    assert (tmp_path / "environment.json").is_file()


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SIM_RUNTIME = {"name": "sim", "order": "timed", "check": False,
               "cost": {"cpu_prep_ms": 6.0, "cpu_update_ms": 2.0, "gpu_compute_ms": 28.0, "launch_eager_ms": 0.5}}


def test_sim_sweep_plots_busy_and_online_latency(tmp_path, capsys):
    path = _write(tmp_path, {
        "name": "sim-online",
        "engine": {"model": {"preset": "tiny", "dtype": "float32"}, "runtime": SIM_RUNTIME,
                   "cache": {"num_blocks": 32}, "batch": {"max_tokens": 64, "max_seqs": 8}},
        "workload": {"name": "synthetic", "num_requests": 4, "prompt_len": {"dist": "fixed", "value": 4},
                     "output_len": {"dist": "fixed", "value": 6},
                     "arrival": {"process": "poisson", "rate": 1000.0}},
        "sweep": {"engine.buffers": ["single", {"name": "n_slot", "num_slots": 3}]},
    })
    code = main(["--log-level", "warning", "run", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads((tmp_path / "o" / "sweep.json").read_text())["rows"]
    assert [r["engine.buffers"] for r in rows] == ["single", {"name": "n_slot", "num_slots": 3}]
    assert rows[0]["busy_fraction"] < rows[1]["busy_fraction"]
    assert "n_slot(num_slots=3)" in out
    csv_rows = _csv_rows(tmp_path / "o" / "sweep.csv")
    assert json.loads(csv_rows[1]["engine.buffers"]) == {"name": "n_slot", "num_slots": 3}
    for name in ("throughput.png", "busy.png", "latency.png"):
        assert _is_png(tmp_path / "o" / name), name


@pytest.fixture
def build_counter(monkeypatch):
    import asyncbatch.core.models as models

    real, calls = models.build_model, []

    def counting(cfg, host):
        calls.append(cfg)
        return real(cfg, host)

    monkeypatch.setattr(models, "build_model", counting)
    return calls


SMALL_WORKLOAD = {"name": "synthetic", "num_requests": 2, "prompt_len": {"dist": "fixed", "value": 4},
                  "output_len": {"dist": "fixed", "value": 2}}


def test_cells_share_the_model_unless_its_section_changes(tmp_path, capsys, build_counter):
    base = {"engine": {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 16}},
            "workload": SMALL_WORKLOAD, "output": {"plots": False}}
    path = _write(tmp_path, {**base, "sweep": {"engine.buffers": ["single", "double"],
                                              "engine.scheduler": ["fifo", "prefill_first"]}})
    assert main(["--log-level", "warning", "run", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert len(build_counter) == 1
    assert len(_csv_rows(tmp_path / "a" / "sweep.csv")) == 4
    assert not list((tmp_path / "a").glob("*.png"))  # output.plots: false
    build_counter.clear()
    path = _write(tmp_path, {**base, "sweep": {"engine.model.dtype": ["float32", "float64"]}})
    assert main(["--log-level", "warning", "run", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert [c.dtype for c in build_counter] == ["float32", "float64"]
    capsys.readouterr()


def test_missing_matplotlib_skips_plots(tmp_path, capsys, monkeypatch):
    import asyncbatch.plugins.plots as plots

    def no_matplotlib():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "_pyplot", no_matplotlib)
    path = _write(tmp_path, {"engine": {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 16}},
                             "workload": SMALL_WORKLOAD, "sweep": {"engine.streams": ["one", "two"]}})
    assert main(["--log-level", "warning", "run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out
    assert len(_csv_rows(tmp_path / "o" / "sweep.csv")) == 2
    assert not list((tmp_path / "o").glob("*.png"))


def test_trace_per_cell(tmp_path, capsys):
    path = _write(tmp_path, {"engine": {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 16}},
                             "workload": SMALL_WORKLOAD, "sweep": {"engine.streams": ["one", "three"]},
                             "output": {"plots": False}})
    trace = tmp_path / "tr" / "trace.json"
    assert main(["--log-level", "warning", "run", str(path), "--out", str(tmp_path / "o"), "--no-progress",
                 "--trace", str(trace)]) == 0
    capsys.readouterr()
    names = []
    for i in range(2):
        data = json.loads((tmp_path / "tr" / f"trace-{i:02d}.json").read_text())
        names.append({e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"})
    assert names == [{"host", "main"}, {"host", "h2d", "compute", "d2h"}]


# ---------------------------------------------------------------- which plot, and how it reads


def _rows(keys: list[str], values: list[tuple], tok=lambda i: 100.0 + i) -> list[dict]:
    from asyncbatch.plugins.sweeps import METRIC_COLUMNS

    return [{**dict(zip(keys, v)), "rep": 0, **dict.fromkeys(METRIC_COLUMNS), "tok_s": tok(i), "busy_fraction": 0.5}
            for i, v in enumerate(values)]


@pytest.fixture
def drawn(monkeypatch):
    """What each saved figure held: per axes, its scales and its error-bar series (lines) or bars."""
    from matplotlib.container import BarContainer, ErrorbarContainer

    import asyncbatch.plugins.plots as plots

    figures, real = {}, plots._save

    def save(plt, fig, path):
        figures[path.name] = [{"scales": (ax.get_xscale(), ax.get_yscale()),
                               "lines": sum(isinstance(c, ErrorbarContainer) for c in ax.containers),
                               "yerr": any(isinstance(c, ErrorbarContainer) and c.has_yerr for c in ax.containers),
                               "bars": sum(isinstance(c, BarContainer) for c in ax.containers),
                               "horizontal": bool(ax.get_yticklabels()) and ax.yaxis_inverted(),
                               "size": tuple(fig.get_size_inches())} for ax in fig.axes if ax.get_visible()]
        return real(plt, fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return figures


def test_numeric_key_with_three_values_gives_lines_grouped_by_the_other_key(tmp_path, drawn):
    from asyncbatch.plugins.plots import plot_sweep

    keys = ["engine.buffers", "engine.batch.max_seqs"]
    rows = _rows(keys, [(b, n) for b in ("single", "double") for n in (1, 2, 4)])
    assert [tmp_path / "throughput.png", tmp_path / "busy.png"] == plot_sweep(tmp_path, keys, rows, online=False)
    (ax,) = drawn["throughput.png"]
    assert (2, 0, ("linear", "linear"), False) == (ax["lines"], ax["bars"], ax["scales"], ax["yerr"])
    two = _rows(keys, [(b, n) for b in ("single", "double") for n in (1, 2)])
    plot_sweep(tmp_path, keys, two, online=True)
    assert (0, 1) == (drawn["throughput.png"][0]["lines"], drawn["throughput.png"][0]["bars"])  # one bar series
    assert 4 == drawn["latency.png"][0]["bars"]  # TTFT and ITL, p50 and p99, one bar series each


def test_lines_log_axes_error_bars_and_zipped_keys(tmp_path, drawn):
    from asyncbatch.plugins.plots import plot_sweep
    from asyncbatch.plugins.sweeps import aggregate

    keys = ["engine.batch.max_seqs", "workload.num_requests", "seed"]  # the first two zipped: one line, not three
    rows = _rows(keys, [(n, 4 * n, s) for n in (1, 10, 100) for s in (0, 1)], tok=lambda i: 10.0 ** (i // 2 * 2) + i % 2)
    plot_sweep(tmp_path, keys, rows, online=True, aggregate=aggregate(keys, rows))
    (ax,) = drawn["throughput.png"]
    assert (1, True, ("log", "log")) == (ax["lines"], ax["yerr"], ax["scales"])
    assert 4 == len(drawn["latency.png"])  # one panel per latency percentile


def test_many_cells_give_horizontal_bars_that_grow(tmp_path, drawn):
    from asyncbatch.plugins.plots import plot_sweep

    keys = ["engine.buffers", "engine.streams", "engine.scheduler"]
    many = [(b, s, c) for b in ("single", "double", "n_slot") for s in ("one", "two", "three")
            for c in ("fifo", "prefill_first")]
    plot_sweep(tmp_path, keys, _rows(keys, many), online=False)
    (wide,) = drawn["throughput.png"]
    plot_sweep(tmp_path, keys, _rows(keys, many[:4]), online=False)
    (few,) = drawn["throughput.png"]
    assert (True, False) == (wide["horizontal"], few["horizontal"])
    assert wide["size"][1] / len(many) >= 0.2  # the figure grows with the cells: every label keeps its row
    plot_sweep(tmp_path, keys, _rows(keys, many[:13]), online=False)
    assert drawn["throughput.png"][0]["horizontal"]  # past 12 cells
    assert _is_png(tmp_path / "throughput.png")
