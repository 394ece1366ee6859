"""Hostile YAML values at every config key fail as a `ConfigError` naming the key, never as another exception.

Every dotted key of the default experiment (fully resolved, so component parameters are included), plus every
parameter of every registered component at its place in the experiment, is set to values a YAML file or a `--set`
can carry: null, booleans, ints far outside int64 and float range, negatives, NaN, infinities, strings, lists and
mappings. Loading may succeed (many values are fine) or raise `ConfigError`; the message must name the key.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbatch.cli import main
from asyncbatch.core.config import ExperimentConfig, _set_path, apply_override, unstructure
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.plugin_host import get_plugin_host

# Where each component family sits in an experiment.
PLACES = {"engine.runtime": "runtime", "engine.scheduler": "scheduler", "engine.buffers": "buffer_policy",
          "engine.streams": "stream_topology", "engine.graphs": "graph_policy",
          "engine.attention": "attention_backend", "workload": "workload"}


def _dotted(data: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a nested mapping, inner nodes included."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else k
            out.append(key)
            out.extend(_dotted(v, key))
    return out


def _get(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _cases() -> list[tuple[str, dict, str]]:
    """(label, base experiment mapping, dotted key to set)."""
    base = ExperimentConfig.from_dict({}).to_dict()
    cases = [("default", base, key) for key in _dotted(base)]
    host = get_plugin_host()
    for place, family in PLACES.items():
        for component in host.registry(family):
            if component.config_cls is None:
                continue
            params = unstructure(component.make_config({}, place))
            data = copy.deepcopy(base)
            _set_path(data, place, {"name": component.name, **params})
            cases.extend((f"{family}:{component.name}", data, f"{place}.{k}") for k in _dotted(params))
    # The saved form of a length holds the fields its `dist` reads: walk each distribution's.
    for dist in ({"dist": "fixed", "value": 8}, {"dist": "lognormal", "median": 40.0, "sigma": 0.5}):
        data = copy.deepcopy(base)
        _set_path(data, "workload.prompt_len", dist)
        data = ExperimentConfig.from_dict(data).to_dict()
        cases.extend((f"length:{dist['dist']}", data, f"workload.prompt_len.{k}") for k in data["workload"]
                     ["prompt_len"])
    return cases


CASES = _cases()

HUGE = [10**400, -(10**400), 10**5000, -(10**5000), 2**31, 2**31 - 1, 2**63, 2**64, -(2**63) - 1]
NASTY = [None, True, False, 0, -1, -(2**31), *HUGE, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0,
         0.5, "", "x", "nan", "1", "auto", [], [None], [10**400], [math.nan], ["x"], {}, {"x": 1}, {"name": "x"},
         {1: [2]}]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
values = st.one_of(scalars, st.sampled_from(NASTY), st.lists(scalars, max_size=3),
                   st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), scalars, max_size=3))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"<{value.bit_length()}-bit int>" if isinstance(value, int) else text[:21] + "..."


def _named(key: str, message: str) -> bool:
    """The message names the key: its last component, or for a component's `name` (switching the component may
    leave parameters the new one does not take), the component's place."""
    parts = key.split(".")
    return parts[-1] in message or (parts[-1] == "name" and len(parts) > 1 and parts[-2] in message)


def _check(base: dict, key: str, value: Any) -> None:
    data = copy.deepcopy(base)
    _set_path(data, key, value)
    try:
        ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        assert _named(key, str(exc)), (key, str(exc))
    # anything else propagates and fails the test


def test_the_walk_covers_component_parameters():
    keys = {key for _, _, key in CASES}
    for key in ("engine.cache.num_blocks", "engine.batch.token_buckets", "sampling.temperature",
                "workload.arrival.rate", "workload.prompt_len.sigma", "engine.buffers.num_slots", "workload.path",
                "engine.runtime.seed"):
        assert key in keys, key


@pytest.mark.parametrize("value", NASTY, ids=[f"{type(v).__name__}{i}" for i, v in enumerate(NASTY)])
def test_every_key_survives_a_nasty_value(value):
    failures = []
    for label, base, key in CASES:
        try:
            _check(base, key, value)
        except Exception as exc:  # noqa: BLE001  (collect every key that fails, not just the first)
            failures.append(f"{label} {key}: {type(exc).__name__}: {str(exc)[:200]}")
    assert not failures, "\n".join(failures)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), value=values)
def test_random_values_at_random_keys(case, value):
    _, base, key = case
    _check(base, key, value)


DEFAULT_KEYS = [key for label, _, key in CASES if label == "default"]


@settings(max_examples=60, deadline=None)
@given(first=st.sampled_from(DEFAULT_KEYS), second=st.sampled_from(DEFAULT_KEYS), a=values, b=values)
def test_two_keys_at_once(first, second, a, b):
    """Cross-field checks (min <= max, max_seqs <= max_tokens...) name one of the keys involved."""
    data = ExperimentConfig.from_dict({}).to_dict()
    try:
        _set_path(data, first, a)
        _set_path(data, second, b)
        ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        assert any(_named(key, str(exc)) for key in (first, second)), (first, second, str(exc))


@settings(max_examples=80, deadline=None)
@given(key=st.sampled_from([k for k in DEFAULT_KEYS if k != "sweep"]), cell_values=st.lists(values, min_size=1,
                                                                                           max_size=3))
def test_sweeps_over_nasty_values(key, cell_values):
    """A sweep cell with a bad value is refused naming the key, however unprintable the value."""
    try:
        ExperimentConfig.from_dict({"sweep": {key: cell_values}})
    except ConfigError as exc:
        assert _named(key, str(exc)), (key, str(exc))


# ---------------------------------------------------------------- specific regressions


@pytest.mark.parametrize("key, value, fragment", [
    ("engine.cache.memory_fraction", 10**400, "engine.cache.memory_fraction"),  # was OverflowError
    ("engine.cache.memory_fraction", math.nan, "engine.cache.memory_fraction: must be in (0, 1]"),
    ("engine.cache.num_blocks", 2**31, "engine.cache.num_blocks: must be <= 2147483647, got 2147483648"),
    ("engine.cache.num_blocks", 10**400, "engine.cache.num_blocks: must be <= 2147483647"),
    ("engine.cache.block_size", 2**31, "engine.cache.block_size: must be <= 2147483647"),
    ("engine.cache.cpu_cache_tokens", 2**31, "engine.cache.cpu_cache_tokens: must be <= 2147483647"),
    ("engine.cache.max_model_len", 2**31, "engine.cache.max_model_len: must be <= 2147483647"),
    ("engine.batch.max_tokens", 2**31, "engine.batch.max_tokens: must be <= 2147483647"),
    ("engine.batch.max_seqs", 2**31, "engine.batch.max_seqs: must be <= 2147483647"),
    ("engine.batch.token_buckets", [8, 2**31], "engine.batch.token_buckets: must be strictly increasing"),
    ("engine.model.seed", 2**64, "engine.model.seed"),
    ("workload.arrival.rate", math.nan, "workload.arrival.rate"),
    ("workload.arrival.rate", math.inf, "workload.arrival.rate"),
    ("workload.arrival.rate", 10**400, "workload.arrival.rate"),
    ("workload.prompt_len.mean", math.nan, "workload.prompt_len.mean"),
    ("workload.prompt_len.sigma", math.inf, "workload.prompt_len.sigma"),
    ("workload.output_len.median", -math.inf, "workload.output_len.median"),
    ("workload.output_len.max", 2**31, "workload.output_len.max"),
    ("workload.prompt_len.min", 0, "workload.prompt_len.min"),
    ("sampling.temperature", 1e-40, "temperature"),
    ("sampling.seed", 2**64, "seed"),
    ("sweep", {1: [2]}, "sweep"),
    ("workload", {"name": "jsonl", "limit": 0}, "workload.limit: must be >= 1"),  # read one line
], ids=lambda v: v if isinstance(v, str) else _short(v))
def test_specific_bad_values_name_the_key(key, value, fragment):
    data = ExperimentConfig.from_dict({}).to_dict()
    _set_path(data, key, value)
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data)
    assert fragment in str(info.value)


def test_limit_sizes_are_accepted():
    cfg = ExperimentConfig.from_dict({"engine": {
        "cache": {"num_blocks": 2**31 - 1, "block_size": 1, "max_model_len": 2**31 - 1},
        "batch": {"max_tokens": 2**31 - 1, "max_seqs": 2**31 - 1}}})
    assert cfg.engine.cache.num_blocks == 2**31 - 1


def test_kv_slot_indices_must_fit_int32():
    """The slot of a token (block * block_size + offset) is written as an int32."""
    with pytest.raises(ConfigError, match=r"engine\.cache\.num_blocks: .*block_size.*2147483647"):
        ExperimentConfig.from_dict({"engine": {"cache": {"num_blocks": 2**20, "block_size": 2**12}}})


def test_lognormal_draws_stay_finite_for_extreme_parameters():
    import random

    from asyncbatch.plugins.workloads import LengthDist

    rng = random.Random(0)
    for kwargs in ({"sigma": 1e200}, {"sigma": 1e200, "median": 3.0}, {"mean": 1e308, "sigma": 50.0},
                   {"mean": 5e-324, "sigma": 0.0}, {"median": 1e308}):
        dist = LengthDist(dist="lognormal", min=2, max=100, **kwargs)
        assert all(2 <= dist.draw(rng) <= 100 for _ in range(50)), kwargs


@pytest.mark.parametrize("text", ["1" * 5000, "[" + "9" * 5000 + "]"])
def test_overrides_with_unreadable_numbers_are_config_errors(text):
    with pytest.raises(ConfigError, match="engine.seed"):
        apply_override({}, f"engine.seed={text}")


def test_yaml_file_with_unreadable_number_is_a_config_error(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("engine:\n  seed: " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match="big.yaml"):
        ExperimentConfig.from_yaml(path)


# ---------------------------------------------------------------- the command line


def _boom(*args, **kwargs):
    raise ZeroDivisionError("boom\nsecond line")


def test_cli_internal_error_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    import asyncbatch.plugins.experiment as experiment

    monkeypatch.setattr(experiment, "run_experiment", _boom)
    code = main(["--log-level", "warning", "run", "--no-progress", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert 1 == code
    assert ("asyncbatch: internal error: ZeroDivisionError: boom second line "
            "(rerun with --log-level debug for the traceback)\n") == err
    assert not (tmp_path / "o").exists()


def test_cli_internal_error_shows_the_traceback_at_debug(tmp_path, capsys, monkeypatch):
    import asyncbatch.plugins.experiment as experiment

    monkeypatch.setattr(experiment, "run_experiment", _boom)
    code = main(["--log-level", "debug", "run", "--no-progress", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert 1 == code
    assert "Traceback (most recent call last)" in err and "_boom" in err
    assert err.rstrip().splitlines()[-1] == "asyncbatch: internal error: ZeroDivisionError: boom second line"


def test_cli_huge_override_is_a_config_error(tmp_path, capsys):
    code = main(["--log-level", "warning", "run", "--set", "engine.cache.memory_fraction=" + "9" * 500,
                 "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert 2 == code
    assert err.startswith("asyncbatch: config error: engine.cache.memory_fraction:")
    assert len(err.splitlines()) == 1
