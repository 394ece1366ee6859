"""Replication and result directories: `repeat: N` (seeds derived per repetition), zipped sweep keys, swept seeds,
the aggregate (mean, std, 95% Student-t interval), `run_experiment` writing what the CLI writes, and `--out`
refusing a directory that holds files unless `--force`. CPU only, tiny model, a few tokens per run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch import ConfigError, ExperimentConfig
from asyncbatch.cli import main
from asyncbatch.plugins.experiment import run_experiment
from asyncbatch.plugins.sweeps import METRIC_COLUMNS, aggregate, mean_std_ci, t975

BASE = {"engine": {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 32},
                   "batch": {"max_tokens": 64, "max_seqs": 4}},
        "workload": {"name": "synthetic", "num_requests": 2, "prompt_len": {"dist": "fixed", "value": 4},
                     "output_len": {"dist": "fixed", "value": 2}},
        "output": {"plots": False, "progress": False}}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _run(capsys, tmp_path: Path, data: dict, *argv: str) -> tuple[int, str, str]:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["--log-level", "warning", "run", str(path), "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("value, message", [(0, "repeat: expected an int >= 1 (runs of every sweep cell), got 0"),
                                            (-2, "repeat: expected an int >= 1 (runs of every sweep cell), got -2"),
                                            ("two", "repeat: expected an int, got str 'two'"),
                                            (True, "repeat: expected an int, got bool True")])
def test_repeat_must_be_a_positive_int(value, message):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"repeat": value})
    assert message == str(e.value)


@pytest.mark.parametrize("sweep, message", [
    ({"zip": {"engine.batch.max_seqs": [8, 16, 32], "workload.num_requests": [32, 64]}},
     "sweep.zip: lists must have equal lengths: engine.batch.max_seqs has 3, workload.num_requests has 2"),
    ({"zip": [1, 2]}, "sweep.zip: expected a mapping of dotted key -> list of values (varied together), got [1, 2]"),
    ({"zip": {"seed": [1, 2]}, "seed": [3]}, "sweep.seed: is both in sweep.zip and outside it: a key varies in one place"),
    ({"zip": {"engine.nope": [1]}}, "sweep.engine.nope: no such key 'engine.nope'"),
    ({"zip": {"seed": []}}, "sweep.zip.seed: expected a non-empty list of values, got []"),
    ({"repeat": [1, 2]}, "sweep.repeat: cannot be swept: `repeat` runs every cell, `sweep` defines them"),
])
def test_bad_sweeps_name_the_key(sweep, message):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"sweep": sweep})
    assert str(e.value).startswith(message), str(e.value)


WHY = ("the two cells would be the same run, seeds included, and would pass for replicates with a spread that is "
       "not there; list each value once, and for replicates set `repeat: N` (repetition i adds i to the seeds)")


@pytest.mark.parametrize("sweep, message", [
    ({"engine.buffers": ["single", "single"]}, "sweep.engine.buffers: lists 'single' twice (positions 1 and 2)"),
    ({"engine.buffers": ["single", "double", {"name": "single"}]},
     "sweep.engine.buffers: 'single' and {'name': 'single'} are read as one value (positions 1 and 3)"),
    ({"sampling.temperature": [0.5, 1, 1.0]}, "sweep.sampling.temperature: 1 and 1.0 are read as one value "
                                              "(positions 2 and 3)"),
    ({"engine.buffers": ["single", "double"], "seed": [3, 4, 3]}, "sweep.seed: lists 3 twice (positions 1 and 3)"),
    ({"zip": {"engine.batch.max_seqs": [4, 8, 4], "workload.num_requests": [8, 16, 8]}},
     "sweep.zip: lists {'engine.batch.max_seqs': 4, 'workload.num_requests': 8} twice (positions 1 and 3)"),
])
def test_a_sweep_that_would_make_one_run_twice_is_refused_naming_the_key_and_value(sweep, message):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"sweep": sweep})
    assert f"{message}: {WHY}" == str(e.value)


def test_a_repeated_sweep_value_is_refused_by_the_cli_before_anything_runs(capsys, tmp_path):
    sweep = {"engine.buffers": ["single", "double", "single"]}
    code, out, err = _run(capsys, tmp_path, {**BASE, "sweep": sweep}, "--out", str(tmp_path / "o"))
    assert (2, "", f"asyncbatch: config error: sweep.engine.buffers: lists 'single' twice (positions 1 and 3): "
                   f"{WHY}\n") == (code, out, err)
    assert not (tmp_path / "o").exists()


def test_cells_made_alike_by_two_keys_are_named_whole():
    from asyncbatch.core.dotted import refuse_repeated_cells

    # Two keys that set one field: only the cells as a whole say which runs coincide.
    axes = [(("engine.batch.max_seqs",), [(4,), (8,)]), (("engine.batch",), [({"max_seqs": 8},), ({"max_seqs": 4},)])]
    resolved = [{"max_seqs": 8}, {"max_seqs": 4}, {"max_seqs": 4}, {"max_seqs": 8}]  # the later key wins
    with pytest.raises(ConfigError) as e:
        refuse_repeated_cells(axes, [(0, 0), (0, 1), (1, 0), (1, 1)], resolved)
    assert ("sweep: cells {'engine.batch.max_seqs': 4, 'engine.batch': {'max_seqs': 4}} and "
            f"{{'engine.batch.max_seqs': 8, 'engine.batch': {{'max_seqs': 8}}}}: {WHY}") == str(e.value)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.sampled_from([0.5, 1, 1.0, 2.0, 2]), min_size=1, max_size=4))
def test_a_sweep_loads_exactly_when_no_two_values_are_read_alike(values):
    distinct = len(set(values)) == len(values)  # a set keeps one of 1 and 1.0, as the config reads them
    try:
        cells = ExperimentConfig.from_dict({"sweep": {"sampling.temperature": values}}).sweep_cells()
    except ConfigError as exc:
        assert (False, "sweep.sampling.temperature") == (distinct, exc.key)
    else:
        assert (True, [float(v) for v in values]) == (distinct, [c.sampling.temperature for _, c in cells])


def test_zip_varies_keys_together_and_the_rest_is_a_product():
    cfg = ExperimentConfig.from_dict({"sweep": {"zip": {"engine.batch.max_seqs": [8, 16, 32],
                                                        "workload.num_requests": [32, 64, 128]},
                                                "engine.buffers": ["single", "double"]}})
    assert ["engine.batch.max_seqs", "workload.num_requests", "engine.buffers"] == cfg.sweep_keys()
    cells = cfg.sweep_cells()
    assert [(8, 32, "single"), (8, 32, "double"), (16, 64, "single"), (16, 64, "double"), (32, 128, "single"),
            (32, 128, "double")] == [tuple(a.values()) for a, _ in cells]
    assert [(a["engine.batch.max_seqs"], a["workload.num_requests"], a["engine.buffers"]) for a, _ in cells] == \
        [(c.engine.batch.max_seqs, c.workload.config.num_requests, c.engine.buffers.name) for _, c in cells]


def test_replica_seeds():
    cfg = ExperimentConfig.from_dict({"seed": 10, "repeat": 3, "engine": {"seed": 5, "model": {"seed": 7}}})
    assert [(10, 5), (11, 6), (12, 7)] == [(cfg.replica(i).seed, cfg.replica(i).engine.seed) for i in range(3)]
    assert {7} == {cfg.replica(i).engine.model.seed for i in range(3)}  # the same model in every repetition
    assert {1} == {cfg.replica(i).repeat for i in range(3)}
    own = ExperimentConfig.from_dict({"workload": {"name": "synthetic", "seed": 40}})
    assert [40, 41] == [own.replica(i).workload.config.seed for i in range(2)]  # a workload's own seed moves too


# ---------------------------------------------------------------- statistics


def test_student_t_interval():
    assert (12.706, 2.228, 2.042, 2.042, 2.021, 2.0, 1.98, 1.98) == tuple(
        t975(df) for df in (1, 10, 30, 39, 40, 60, 120, 10_000))
    mean, std, ci = mean_std_ci([1.0, 2.0, 3.0, 4.0])
    assert 2.5 == mean
    assert math.sqrt(5 / 3) == pytest.approx(std)
    assert 3.182 * math.sqrt(5 / 3) / 2 == pytest.approx(ci)
    assert (5.0, None, None) == mean_std_ci([5.0])
    assert (None, None, None) == mean_std_ci([])


def _row(buffers: str, seed: int, tok_s: float) -> dict:
    return {"engine.buffers": buffers, "seed": seed, "rep": 0, **dict.fromkeys(METRIC_COLUMNS), "tok_s": tok_s}


def test_aggregate_groups_rows_that_differ_only_by_seed_or_repetition():
    rows = [_row("single", 0, 10.0), _row("single", 1, 14.0), _row("double", 0, 20.0), _row("double", 1, 20.0)]
    agg = aggregate(["engine.buffers", "seed"], rows)
    # single: mean 12, s = sqrt(8), half-width 12.706 * sqrt(8) / sqrt(2) = 25.412.
    assert [("single", 2, 12.0, math.sqrt(8), 25.412), ("double", 2, 20.0, 0.0, 0.0)] == \
        [(a["engine.buffers"], a["n"], a["tok_s_mean"], pytest.approx(a["tok_s_std"]), pytest.approx(a["tok_s_ci95"]))
         for a in agg]
    assert [None, None] == [a["busy_fraction_mean"] for a in agg]  # nothing measured: no number
    assert "seed" not in agg[0]
    assert aggregate(["engine.buffers", "seed"], rows[::2]) is None  # nothing replicated


# ---------------------------------------------------------------- real runs


def test_repeat_runs_with_derived_seeds_and_aggregates(tmp_path, capsys):
    code, out, _ = _run(capsys, tmp_path, {**BASE, "repeat": 3, "seed": 4}, "--out", str(tmp_path / "o"))
    assert 0 == code
    o = tmp_path / "o"
    dirs = sorted(p.name for p in (o / "cells").iterdir())
    assert ["00-rep=0", "00-rep=1", "00-rep=2"] == dirs
    results = [json.loads((o / "cells" / d / "results.json").read_text()) for d in dirs]
    assert [{"seed": 4 + r, "engine": r, "model": 0} for r in range(3)] == [res["seeds"] for res in results]
    assert [0, 1, 2] == [res["repetition"] for res in results]
    assert 3 == len({o_["tokens_sha1"] for res in results for o_ in res["outputs"][:1]})  # different prompts
    saved = [yaml.safe_load((o / "cells" / d / "config.yaml").read_text()) for d in dirs]
    assert [(4 + r, r, 1) for r in range(3)] == [(c["seed"], c["engine"]["seed"], c["repeat"]) for c in saved]
    assert 3 == yaml.safe_load((o / "config.yaml").read_text())["repeat"]
    rows = _csv(o / "sweep.csv")
    assert ["0", "1", "2"] == [r["rep"] for r in rows]
    (agg,) = _csv(o / "aggregate.csv")
    tok = [float(r["tok_s"]) for r in rows]
    mean, std, ci = mean_std_ci(tok)
    assert ("3", mean, std, ci) == (agg["n"], pytest.approx(float(agg["tok_s_mean"])),
                                    pytest.approx(float(agg["tok_s_std"])), pytest.approx(float(agg["tok_s_ci95"])))
    data = json.loads((o / "aggregate.json").read_text())
    assert ([], ["rep"], 0.95) == (data["keys"], data["replicate_keys"], data["confidence"])
    line = next(x for x in out.splitlines() if x.split()[:1] == ["3"])
    assert f"{mean:.2f} ± {ci:.2f}" in line
    assert "aggregate: " in out


def test_swept_seeds_are_replicates(tmp_path, capsys):
    data = {**BASE, "sweep": {"engine.buffers": ["single", "double"], "seed": [0, 1]}}
    code, out, _ = _run(capsys, tmp_path, data, "--out", str(tmp_path / "o"))
    assert 0 == code
    agg = _csv(tmp_path / "o" / "aggregate.csv")
    assert [("single", "2"), ("double", "2")] == [(a["engine.buffers"], a["n"]) for a in agg]
    assert "seed" not in agg[0]
    sweep = _csv(tmp_path / "o" / "sweep.csv")
    for a in agg:
        tok = [float(r["tok_s"]) for r in sweep if r["engine.buffers"] == a["engine.buffers"]]
        assert sum(tok) / 2 == pytest.approx(float(a["tok_s_mean"]))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_python_run_experiment_writes_what_the_cli_writes(tmp_path, capsys):
    data = {**BASE, "output": {"plots": True, "progress": False}, "repeat": 2,
            "sweep": {"engine.streams": ["one", "two"]}}
    code, _, _ = _run(capsys, tmp_path, data, "--out", str(tmp_path / "cli"))
    assert 0 == code
    result = run_experiment(ExperimentConfig.from_dict(data), tmp_path / "py", progress=False, echo=lambda _: None)
    assert _files(tmp_path / "cli") == _files(tmp_path / "py")
    assert {"sweep.csv", "sweep.json", "aggregate.csv", "aggregate.json", "throughput.png", "config.yaml",
            "environment.json"} <= _files(tmp_path / "py")
    assert (tmp_path / "py" / "throughput.png",) == result.plots
    assert 4 == len(result) and 2 == len(result.aggregate)


def test_out_dir_that_holds_files_is_refused_unless_forced(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    import asyncbatch.core.models as models

    real, built = models.build_model, []
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(1) or real(*a, **k))
    code, _, err = _run(capsys, tmp_path, BASE, "--out", str(out))
    assert 2 == code
    assert f"asyncbatch: config error: --out: {out} exists and is not empty" in err and "--force" in err
    with pytest.raises(ConfigError, match="not empty"):
        run_experiment(ExperimentConfig.from_dict(BASE), out, echo=lambda _: None)
    assert [] == built
    assert ["notes.txt"] == [p.name for p in out.iterdir()]
    code, _, _ = _run(capsys, tmp_path, BASE, "--out", str(out), "--force")
    assert 0 == code
    assert {"notes.txt", "results.json", "config.yaml", "environment.json"} == {p.name for p in out.iterdir()}
    assert "mine" == (out / "notes.txt").read_text()
    (tmp_path / "file").write_text("")
    code, _, err = _run(capsys, tmp_path, BASE, "--out", str(tmp_path / "file"), "--force")
    assert 2 == code and "is not a directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert 0 == _run(capsys, tmp_path, BASE, "--out", str(empty))[0]  # an empty directory is fine
