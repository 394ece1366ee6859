"""Sweeps a sixth probe found mishandled: `--set sweep.engine.buffers=[single]` (the natural way to change one axis
of a sweep file) made a mapping `sweep: {engine: {buffers: ...}}` and failed as "sweep.engine: expected a non-empty
list of values"; and a sweep of `engine.seed` and `seed` labelled its cells, tables and directories `seed=1, seed=3`.
"""

from __future__ import annotations

from asyncbatch import ExperimentConfig
from asyncbatch.plugins.report import cell_label
from asyncbatch.plugins.sweeps import sweep_table


def test_set_changes_one_axis_of_a_sweep_file():
    config = ExperimentConfig.from_yaml("configs/sweep-buffers.yaml", overrides=["sweep.engine.buffers=[single]"])

    assert {"engine.buffers": ["single"], "engine.batch.max_seqs": [4, 16]} == config.sweep


def test_set_adds_a_key_to_a_zip_group():
    config = ExperimentConfig.from_yaml("configs/default.yaml", overrides=["sweep.zip.engine.seed=[1, 2]",
                                                                          "sweep.zip.seed=[3, 4]"])

    assert {"zip": {"engine.seed": [1, 2], "seed": [3, 4]}} == config.sweep


def test_keys_with_one_last_part_are_labelled_apart():
    assert ("engine.seed=1, seed=3", "buffers=single, max_seqs=4") == (
        cell_label({"engine.seed": 1, "seed": 3}), cell_label({"engine.buffers": "single", "engine.batch.max_seqs": 4}))


def test_the_sweep_table_names_such_keys_apart():
    table = sweep_table(["engine.seed", "seed"], [{"engine.seed": 1, "seed": 3}])

    assert ["engine.seed", "seed"] == table.splitlines()[0].split()[:2]
