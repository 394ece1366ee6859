"""Inputs a fifth probe found mishandled: a jsonl workload that starts with a UTF-8 BOM was refused as not JSON, and
`"id": null` became the request id "None"; a lognormal length given both `mean` and `median` used the median
without a word; an unknown key of a component that takes no settings said "(valid: none)", as if `none` were a
key; and `asyncbatch compare` on a file said "no such directory"."""

from __future__ import annotations

import json
import random

import attrs
import pytest

from asyncbatch import ExperimentConfig
from asyncbatch.cli import main
from asyncbatch.core.config import EngineConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.structure import structure
from asyncbatch.core.types import SamplingParams
from asyncbatch.plugins.workloads import JsonlConfig, JsonlPrompts, LengthDist, checked_requests
from asyncbatch.serve.bench_client import BenchRequest
from asyncbatch.serve.bench_workload import read_dataset


def _requests(path):
    return JsonlPrompts(JsonlConfig(path=str(path)), vocab_size=512).requests(SamplingParams())


# ---------------------------------------------------------------- jsonl: a BOM, a null id


def test_a_jsonl_file_that_starts_with_a_bom_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt_ids": [1, 2], "max_new_tokens": 3}\n{"prompt_ids": [4]}\n')

    made = _requests(path)

    assert [("req-0", (1, 2), 3), ("req-1", (4,), 16)] == \
        [(r.request_id, r.prompt_ids, r.params.max_new_tokens) for r in made]
    assert (BenchRequest((1, 2), 3), BenchRequest((4,), 8)) == read_dataset(str(path), None, 8, "--dataset")


def test_a_null_id_is_no_id(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt_ids": [1], "id": None}, {"prompt_ids": [2], "id": "mine"}, {"prompt_ids": [3], "id": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    made = checked_requests(_requests(path), "jsonl")  # distinct ids, or this refuses them

    assert ["req-0", "mine", "req-2"] == [r.request_id for r in made]


# ---------------------------------------------------------------- lognormal: mean or median


def _workload(prompt_len: dict) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"workload": {"name": "synthetic", "prompt_len": prompt_len}})


def test_a_lognormal_length_with_both_mean_and_median_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        _workload({"dist": "lognormal", "mean": 100, "median": 50, "min": 1, "max": 500})

    assert ("workload.prompt_len: lognormal takes `mean` or `median`, not both (got mean 100 and median 50): give "
            "one of them") == str(info.value)


@pytest.mark.parametrize("given", [{"median": 50.0}, {"mean": 100.0}, {}])
def test_a_lognormal_length_with_one_of_them_reloads_from_its_saved_config(given):
    cfg = _workload({"dist": "lognormal", "min": 1, "max": 500, **given})

    assert cfg == ExperimentConfig.from_dict(cfg.to_dict())  # the resolved config.yaml of a run


def test_a_lognormal_length_with_neither_draws_as_with_a_mean_of_64():
    neither, mean = LengthDist(dist="lognormal", sigma=0.8), LengthDist(dist="lognormal", sigma=0.8, mean=64.0)
    a, b = random.Random(3), random.Random(3)

    assert [mean.draw(b) for _ in range(50)] == [neither.draw(a) for _ in range(50)]


# ---------------------------------------------------------------- an unknown key of a component without settings


@pytest.mark.parametrize(("field", "name", "family"), [
    ("prefix_cache", "blocks", "prefix_cache"),
    ("prefix_cache", "radix", "prefix_cache"),
    ("streams", "three", "stream_topology"),
    ("graphs", "eager", "graph_policy"),
    ("runtime", "cpu", "runtime"),
])
def test_an_unknown_key_of_a_component_without_settings_says_so_in_words(field, name, family):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"model": {"preset": "tiny", "device": "cpu"}, field: {"name": name, "bogus": 1}},
                               key="engine")

    assert (f"engine.{field}.bogus: unknown key: {family} {name!r} takes no settings besides `name`") == \
        str(info.value)


def test_an_unknown_key_of_a_class_without_fields_says_so_in_words():
    @attrs.frozen
    class Empty:
        pass

    with pytest.raises(ConfigError) as info:
        structure(Empty, {"bogus": 1}, "section")

    assert "section.bogus: unknown key: Empty has no settings" == str(info.value)
    assert Empty() == structure(Empty, {}, "section")


# ---------------------------------------------------------------- compare: a file that is no results file


@pytest.mark.parametrize("name", ["notes.txt", "aggregate.json", "config.yaml"])
def test_compare_on_a_file_says_it_is_a_file_not_a_run_directory(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("{}\n")

    code = main(["--log-level", "warning", "compare", str(path), str(tmp_path), "--out", str(tmp_path / "cmp")])

    assert (2, f"asyncbatch: config error: {path}: is a file, not a run directory: give a run directory (it holds "
               "results.json) or a sweep directory (it holds sweep.json), or one of those two files\n") == \
        (code, capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()
