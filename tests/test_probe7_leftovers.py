"""Leftovers of input probe 7: a swept or set length-distribution field that the distribution ignores, swept seeds
that `repeat` makes overlap, and an unbounded `asyncbatch simulate --requests`."""

from __future__ import annotations

import pytest

from asyncbatch.cli import main
from asyncbatch.core.config import ExperimentConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.plugins.workloads import LengthDist

UNIFORM = {"name": "synthetic", "prompt_len": {"dist": "uniform", "min": 16, "max": 128}}


# ---------------------------------------------------------------- 1. fields a distribution ignores


def test_sweeping_a_field_the_distribution_ignores_is_refused():
    data = {"workload": UNIFORM, "sweep": {"workload.prompt_len.value": [100, 200]}}
    with pytest.raises(ConfigError, match=r"^sweep\.workload\.prompt_len\.value: `dist: uniform` does not read "
                                          r"value \(it reads min, max\), so 100 would be silently ignored"):
        ExperimentConfig.from_dict(data)


def test_sweeping_an_ignored_field_is_refused_even_at_its_default():
    data = {"workload": UNIFORM, "sweep": {"workload.prompt_len.value": [32]}}
    with pytest.raises(ConfigError, match=r"^sweep\.workload\.prompt_len\.value: workload\.prompt_len resolves to "
                                          r"\{'dist': 'uniform', 'min': 16, 'max': 128\}, which does not read value"):
        ExperimentConfig.from_dict(data)


@pytest.mark.parametrize("dist, field, reads", [
    ({"dist": "uniform", "value": 100}, "value", "min, max"),
    ({"dist": "fixed", "value": 8, "max": 64}, "max", "value"),
    ({"dist": "fixed", "value": 8, "sigma": 2.0}, "sigma", "value"),
    ({"dist": "uniform", "min": 2, "max": 9, "median": 5.0}, "median", "min, max"),
])
def test_setting_a_field_the_distribution_ignores_is_refused(dist, field, reads):
    with pytest.raises(ConfigError, match=rf"^workload\.prompt_len\.{field}: `dist: {dist['dist']}` does not read "
                                          rf"{field} \(it reads {reads}\)"):
        ExperimentConfig.from_dict({"workload": {"name": "synthetic", "prompt_len": dist}})


def test_a_set_override_of_an_ignored_field_is_refused(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("workload:\n  name: synthetic\n  prompt_len: {dist: uniform, min: 16, max: 128}\n")
    with pytest.raises(ConfigError, match=r"^workload\.prompt_len\.value: `dist: uniform` does not read value"):
        ExperimentConfig.from_yaml(path, overrides=["workload.prompt_len.value=100"])


def test_the_saved_form_holds_what_the_distribution_reads_and_an_older_save_still_loads():
    older = {"dist": "uniform", "value": 32, "min": 2, "max": 9, "mean": None, "sigma": 0.5, "median": None}
    exp = ExperimentConfig.from_dict({"workload": {"name": "synthetic", "prompt_len": older, "output_len": 7}})
    saved = exp.to_dict()["workload"]
    assert ({"dist": "uniform", "min": 2, "max": 9}, {"dist": "fixed", "value": 7}) == (saved["prompt_len"],
                                                                                         saved["output_len"])
    assert exp == ExperimentConfig.from_dict(exp.to_dict())
    assert {"dist": "lognormal", "median": 40.0, "sigma": 0.5, "min": 1, "max": 1024} == \
        ExperimentConfig.from_dict({"workload": {"name": "synthetic", "prompt_len": {"dist": "lognormal",
                                                                                     "median": 40}}}
                                   ).to_dict()["workload"]["prompt_len"]
    assert LengthDist(dist="fixed", value=5) == LengthDist(dist="fixed", value=5, min=1, max=1024)


# ---------------------------------------------------------------- 2. repeat with swept seeds


@pytest.mark.parametrize("key", ["seed", "engine.seed"])
def test_swept_seeds_that_repeat_would_overlap_are_refused(key):
    with pytest.raises(ConfigError, match=rf"^sweep\.{key}: with repeat: 2, the cell with {key} 0 runs {key} 1 as "
                                          rf"its repetition 1, which the cell with {key} 1 runs as its repetition "
                                          r"0: replicates would share seeds"):
        ExperimentConfig.from_dict({"sweep": {key: [0, 1]}, "repeat": 2})


def test_swept_seeds_spaced_by_repeat_run_and_keep_their_replica_seeds():
    exp = ExperimentConfig.from_dict({"sweep": {"seed": [0, 2], "engine.buffers": ["single", "double"]},
                                      "repeat": 2})
    runs = sorted((cell.replica(r).seed, cell.engine.buffers.name) for _, cell in exp.sweep_cells()
                  for r in range(2))
    assert [(s, b) for s in range(4) for b in ("double", "single")] == runs
    # a workload's own seed is a swept seed as well
    with pytest.raises(ConfigError, match=r"^sweep\.workload\.seed: with repeat: 3, the cell with workload\.seed 5"):
        ExperimentConfig.from_dict({"workload": {"name": "synthetic", "seed": 5},
                                    "sweep": {"workload.seed": [5, 7]}, "repeat": 3})


# ---------------------------------------------------------------- 3. simulate --requests


def test_simulate_refuses_more_requests_than_its_bound_naming_the_flag(capsys, monkeypatch):
    import asyncbatch.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for an invalid study")

    monkeypatch.setattr(models, "build_model", refuse)
    code = main(["simulate", "--requests", "100000"])
    err = capsys.readouterr().err
    assert (2, True) == (code, "--requests: must be at most 1024, got 100000" in err)
