"""`output_len: 64` is the short form of a fixed length, `{dist: fixed, value: 64}`, wherever a length goes."""

from __future__ import annotations

import pytest

from asyncbatch.core.config import ExperimentConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.structure import structure
from asyncbatch.core.types import SamplingParams
from asyncbatch.plugins.prefix_workloads import SharedPrefixConfig
from asyncbatch.plugins.workloads import LengthDist, Synthetic


def test_a_bare_int_is_a_fixed_length_in_an_experiment_and_its_requests():
    cfg = ExperimentConfig.from_dict({"workload": {"name": "synthetic", "num_requests": 5, "prompt_len": 7,
                                                   "output_len": 3}})
    workload = Synthetic(cfg.workload.config, vocab_size=100, seed=0)
    requests = workload.requests(SamplingParams())

    assert (LengthDist(dist="fixed", value=3), LengthDist(dist="fixed", value=7)) == (
        cfg.workload.config.output_len, cfg.workload.config.prompt_len)
    assert [(7, 3)] * 5 == [(len(r.prompt_ids), r.params.max_new_tokens) for r in requests]


def test_the_short_form_works_for_every_workload_length():
    config = structure(SharedPrefixConfig, {"prefix_len": 50, "question_len": 4, "output_len": 2}, "workload")

    assert [50, 4, 2] == [config.prefix_len.value, config.question_len.value, config.output_len.value]


@pytest.mark.parametrize(("value", "expected"), [
    ("long", "workload.output_len: expected a length (an int, for a fixed one) or a mapping of LengthDist fields, "
             "got str 'long'"),
    (2.5, "workload.output_len: expected a length (an int, for a fixed one) or a mapping of LengthDist fields, "
          "got float 2.5"),
    (0, "workload.output_len.value: must be in [1, 2147483647], got 0"),
    (True, "workload.output_len: expected a mapping of LengthDist fields, got bool True"),
])
def test_a_bad_short_form_names_the_key(value, expected):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"workload": {"name": "synthetic", "output_len": value}})

    assert expected == str(info.value)
