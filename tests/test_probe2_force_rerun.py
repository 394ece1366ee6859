"""`--force` into a directory that holds an earlier experiment: the top-level index files (results.json,
sweep.json/csv, aggregate.json/csv) describe the new experiment only, so `asyncbatch compare` and readers never
take an earlier run's numbers for the new one's."""

from __future__ import annotations

import json

import yaml

from asyncbatch.cli import main
from asyncbatch.plugins.compare import load_results

BASE = {"engine": {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 32},
                   "batch": {"max_tokens": 64, "max_seqs": 4}},
        "workload": {"name": "synthetic", "num_requests": 2, "prompt_len": {"dist": "fixed", "value": 4},
                     "output_len": {"dist": "fixed", "value": 2}},
        "output": {"plots": False, "progress": False}}


def _run(tmp_path, name, extra, out, *flags):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    assert 0 == main(["--log-level", "warning", "run", str(path), "--out", str(out), "--no-progress", *flags])


def test_a_sweep_without_replicates_forced_over_a_replicated_one_is_read_as_itself(tmp_path):
    out = tmp_path / "out"
    _run(tmp_path, "reps", {"repeat": 2, "sweep": {"engine.batch.max_seqs": [2, 4]}}, out)
    _run(tmp_path, "new", {"sweep": {"engine.batch.max_seqs": [8, 16]}}, out, "--force")

    got = load_results(out)
    assert ("sweep", [{"engine.batch.max_seqs": 8}, {"engine.batch.max_seqs": 16}]) == \
        (got.kind, [e["assignment"] for e in got.entries])
    assert not (out / "aggregate.json").exists() and not (out / "aggregate.csv").exists()


def test_a_single_run_forced_over_a_sweep_is_read_as_the_run(tmp_path):
    out = tmp_path / "out"
    _run(tmp_path, "sweep", {"sweep": {"engine.batch.max_seqs": [2, 4]}}, out)
    _run(tmp_path, "one", {}, out, "--force")

    got = load_results(out)
    assert ("run", 2) == (got.kind, json.loads((out / "results.json").read_text())["summary"]["num_requests"])
    assert not (out / "sweep.json").exists() and not (out / "sweep.csv").exists()
