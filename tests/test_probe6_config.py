"""Configuration a sixth probe found mishandled. A key given twice in a YAML mapping (a second `engine:` section
further down a file, or `--set 'engine.batch={max_seqs: 4, max_seqs: 8}'`) silently kept only the last one; a value
`asyncbatch simulate` could not read (an int of more than 4300 digits) in `--buffers` or `--scheduler` was an
"internal error"; and `Engine.warmup` with an unknown sampling path failed with "tuple.index(x): x not in tuple"."""

from __future__ import annotations

import pytest

from asyncbatch import Engine, EngineConfig, ExperimentConfig
from asyncbatch.cli import main
from asyncbatch.core.config_file import load_yaml
from asyncbatch.core.dotted import parse_value
from asyncbatch.core.errors import ConfigError

BIG = "1" * 5000


def test_a_key_given_twice_in_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("engine: {buffers: single}\nworkload: {name: synthetic}\nengine:\n  streams: one\n")

    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml(path)

    assert (f'{path} is not valid YAML: found the key \'engine\' here\n  in "{path}", line 1, column 1\n'
            "and again here (a key given twice in one mapping would silently replace the first)\n"
            f'  in "{path}", line 3, column 1') == str(info.value)


def test_a_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("base: &b {buffers: single, streams: one}\nengine:\n  <<: *b\n  buffers: double\n")

    assert {"buffers": "double", "streams": "one"} == load_yaml(path)["engine"]


def test_a_key_given_twice_in_a_set_value_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml("configs/default.yaml", overrides=["engine.batch={max_seqs: 4, max_seqs: 8}"])

    assert ("engine.batch", "cannot read the value '{max_seqs: 4, max_seqs: 8}': it gives the key 'max_seqs' twice "
            "(the second would silently replace the first)") == (info.value.key, info.value.message)


@pytest.mark.parametrize(("args", "flag"), [
    (["--buffers", f"[{BIG}]"], "--buffers"),
    (["--buffers", f"n_slot:num_slots={BIG}"], "--buffers"),
    (["--scheduler", f"{{name: fifo, x: {BIG}}}"], "--scheduler"),
])
def test_simulate_names_the_flag_of_a_value_it_cannot_read(capsys, args, flag):
    code = main(["simulate", *args])

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (2, f"asyncbatch: config error: {flag}: cannot read the value: Exceeds the limit") == (
        code, err[: len(f"asyncbatch: config error: {flag}: cannot read the value: Exceeds the limit")])


@pytest.mark.parametrize("modes", [("bogus",), "greedy"])
def test_warmup_names_the_sampling_paths(tiny32, modes):
    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))

    with pytest.raises(ValueError) as info:
        engine.warmup(modes=modes)

    assert f"modes must be a list of sampling paths among greedy, sample, filter; got {modes!r}" == str(info.value)


@pytest.mark.parametrize(("text", "value"), [
    ("010", 10),  # YAML 1.1: octal 8, so `num_requests: 010` ran 8 requests
    ("-010", -10),
    ("1:30", "1:30"),  # YAML 1.1: base 60, 90
    ("1:30.5", "1:30.5"),
    ("0x1F", 31),
    ("1e-3", 1e-3),
])
def test_numbers_read_as_yaml_1_2_reads_them(text, value):
    assert value == parse_value(text)


def test_a_leading_zero_count_runs_that_many_requests():
    config = ExperimentConfig.from_yaml("configs/default.yaml", overrides=["workload.num_requests=010"])

    assert 10 == config.workload.config.num_requests


@pytest.mark.parametrize(("value", "shown"), [("2026-11-28", "date datetime.date(2026, 11, 28)"),
                                              ("1.0", "float 1.0"), ("no", "bool False")])
def test_a_name_yaml_reads_as_no_text_says_to_quote_it(value, shown):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml("configs/default.yaml", overrides=[f"name={value}"])

    assert ("name", f"expected a string, got {shown} (in YAML an unquoted date, number or on/off/yes/no is not "
            "text: quote it)") == (info.value.key, info.value.message)


@pytest.mark.parametrize("item", ["=3", " =3", "engine..seed=3", "engine.seed.=3"])
def test_an_override_with_an_empty_key_part_says_so(item):
    from asyncbatch.core.dotted import apply_override

    with pytest.raises(ConfigError, match="the key or one of its dotted parts is empty"):
        apply_override({}, item)


def test_a_directory_given_as_the_config_file_is_named_a_directory(tmp_path):
    from asyncbatch import EngineConfig

    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        EngineConfig.from_yaml(tmp_path)
