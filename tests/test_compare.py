"""`asyncbatch compare A B`: runs and sweeps side by side (cells matched by assignment, unmatched ones listed,
replicated sweeps compared by their means), the files it writes, and clear errors for paths that are not
results. The result directories come from real tiny runs on the CPU, made once for the module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from asyncbatch.cli import main
from asyncbatch.plugins.sweeps import METRIC_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"
BASE = {"engine": {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 32},
                   "batch": {"max_tokens": 64, "max_seqs": 4}},
        "workload": {"name": "synthetic", "num_requests": 2, "prompt_len": {"dist": "fixed", "value": 4},
                     "output_len": {"dist": "fixed", "value": 2}},
        "output": {"plots": False, "progress": False}}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    made = {}
    for name, extra in {"run_a": {}, "run_b": {"engine": {**BASE["engine"], "buffers": "single"}},
                        "run_sim": {"engine": {**BASE["engine"], "runtime": "sim"}},
                        "sweep_a": {"sweep": {"engine.buffers": ["single", "double"]}},
                        "sweep_b": {"sweep": {"engine.buffers": ["double", {"name": "n_slot", "num_slots": 3}]}},
                        "reps": {"repeat": 2, "sweep": {"engine.buffers": ["single", "double"]}}}.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**BASE, **extra}))
        assert 0 == main(["--log-level", "warning", "run", str(path), "--out", str(root / name), "--no-progress"])
        made[name] = root / name
    return made


def _compare(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "warning", "compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _table(out: str) -> dict[tuple[str, str], list[str]]:
    """(cell, metric) -> [A, B, B - A, B / A] of the printed table (cell "" when there is one pair)."""
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.split()[-4:] == ["B", "-", "A", "B"] or "B / A" in x)
    rows = {}
    for line in lines[start + 2:]:
        parts = line.split()
        if not parts or parts[0].startswith(("only", "(latencies")):
            break
        cell = " ".join(parts[:-5]) if len(parts) > 5 else ""
        rows[cell, parts[-5]] = parts[-4:]
    return rows


def test_two_runs(results, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _compare(capsys, results["run_a"], results["run_b"])
    assert 0 == code
    a = json.loads((results["run_a"] / "results.json").read_text())["summary"]
    b = json.loads((results["run_b"] / "results.json").read_text())["summary"]
    row = _table(out)["", "tok_s"]
    assert [f"{a['tokens_per_s']:.2f}", f"{b['tokens_per_s']:.2f}", f"{b['tokens_per_s'] - a['tokens_per_s']:.2f}",
            f"{b['tokens_per_s'] / a['tokens_per_s']:.3f}"] == row
    (made,) = tmp_path.glob("compare-*")  # the default output directory, under the current directory
    data = json.loads((made / "compare.json").read_text())
    assert [m for m in METRIC_COLUMNS] == [r["metric"] for r in data["rows"]]
    ttft = next(r for r in data["rows"] if r["metric"] == "ttft_p90_ms")
    assert (a["ttft_p90"] * 1e3, b["ttft_p90"] * 1e3) == (pytest.approx(ttft["a"]), pytest.approx(ttft["b"]))
    assert ttft["b"] - ttft["a"] == pytest.approx(ttft["diff"])
    assert ([], []) == (data["only_a"], data["only_b"])
    assert (made / "compare.png").read_bytes()[:8] == PNG
    with (made / "compare.csv").open() as fh:
        assert len(METRIC_COLUMNS) == len(list(csv.DictReader(fh)))
    assert f"written: {Path('.') / made.name / 'compare.json'}" in out


def test_runs_on_different_runtimes_are_compared_with_a_note_on_their_clocks(results, tmp_path, capsys):
    _, same, _ = _compare(capsys, results["run_a"], results["run_b"], "--out", tmp_path / "same")
    _, mixed, _ = _compare(capsys, results["run_a"], results["run_sim"], "--out", tmp_path / "mixed")

    assert "note:" not in same
    assert ("note: A ran on the 'cpu' runtime and B on 'sim': their times come from different clocks (the sim "
            "runtime's times are virtual)") in mixed


def test_sweeps_match_cells_by_assignment(results, tmp_path, capsys):
    code, out, _ = _compare(capsys, results["sweep_a"], results["sweep_b"], "--out", tmp_path / "c")
    assert 0 == code
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert {"buffers=double"} == {r["cell"] for r in data["rows"]}
    assert ([{"engine.buffers": "single"}], [{"engine.buffers": {"name": "n_slot", "num_slots": 3}}]) == \
        (data["only_a"], data["only_b"])
    assert "only in A: buffers=single" in out and "only in B: buffers=n_slot(num_slots=3)" in out
    rows_a = json.loads((results["sweep_a"] / "sweep.json").read_text())["rows"]
    rows_b = json.loads((results["sweep_b"] / "sweep.json").read_text())["rows"]
    tok = next(r for r in data["rows"] if r["metric"] == "tok_s")
    assert (rows_a[1]["tok_s"], rows_b[0]["tok_s"]) == (tok["a"], tok["b"])
    assert rows_b[0]["tok_s"] / rows_a[1]["tok_s"] == pytest.approx(tok["ratio"])
    with (tmp_path / "c" / "compare.csv").open() as fh:
        first = next(csv.DictReader(fh))
    assert ("double", "buffers=double", "tok_s") == (first["engine.buffers"], first["cell"], first["metric"])


def test_replicated_sweeps_compare_means(results, tmp_path, capsys):
    code, out, _ = _compare(capsys, results["reps"], results["sweep_a"], "--out", tmp_path / "c")
    assert 0 == code
    agg = json.loads((results["reps"] / "aggregate.json").read_text())["rows"]
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert ("aggregate", "sweep") == (data["a"]["kind"], data["b"]["kind"])
    tok = [r for r in data["rows"] if r["metric"] == "tok_s"]
    assert [(a["tok_s_mean"], a["tok_s_ci95"], 2) for a in agg] == [(r["a"], r["a_ci95"], r["a_n"]) for r in tok]
    assert "means over replicates" in out


def test_not_results_is_a_clear_error(results, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _compare(capsys, tmp_path / "empty", results["run_a"])
    assert 2 == code
    assert (f"asyncbatch: config error: {tmp_path / 'empty'}: not a results directory: it has neither results.json "
            "(one run) nor sweep.json (a sweep)\n") == err
    code, _, err = _compare(capsys, results["run_a"], tmp_path / "missing")
    assert 2 == code and f"{tmp_path / 'missing'}: not a results directory: no such directory" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    code, _, err = _compare(capsys, tmp_path / "bad", results["run_a"])
    assert 2 == code and "cannot be read as asyncbatch results" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    code, _, err = _compare(capsys, results["run_a"], results["run_b"], "--out", tmp_path / "taken")
    assert 2 == code and "not empty" in err and "--force" in err
    assert 0 == _compare(capsys, results["run_a"], results["run_b"], "--out", tmp_path / "taken", "--force")[0]
    assert (tmp_path / "taken" / "compare.json").is_file()
