"""A checkpoint's generation_config.json decides where requests stop (its eos_token_id). One that cannot be read,
or whose eos_token_id is no token id, is a one-line config error on `engine.model.path` naming the file, where
transformers would fall back to other EOS ids (or none) without a word."""

from __future__ import annotations

import json

import pytest
import yaml

from asyncbatch import ConfigError, Engine, EngineConfig
from asyncbatch.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny32):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    tiny32.save_pretrained(path)
    return path


def _spoiled(checkpoint, tmp_path, text: str):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    (path / "generation_config.json").write_text(text)
    return path


CASES = {
    "not_json": ("{not json", "generation_config.json is unreadable: JSONDecodeError: "),
    "not_an_object": ("[2]", "generation_config.json is unreadable: expected a JSON object, got list"),
    "eos_a_string": (json.dumps({"eos_token_id": "</s>"}),
                     "generation_config.json: eos_token_id: expected a token id or a list of token ids, got '</s>'"),
    "eos_list_of_floats": (json.dumps({"eos_token_id": [2, 3.0]}),
                           "generation_config.json: eos_token_id: expected a token id or a list of token ids, got "
                           "[2, 3.0]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_generation_config_is_a_config_error_naming_the_file(case, checkpoint, tmp_path):
    text, fragment = CASES[case]
    path = _spoiled(checkpoint, tmp_path, text)

    with pytest.raises(ConfigError) as info:
        Engine.from_config(EngineConfig.from_dict({"model": {"path": str(path)}, "runtime": "cpu"}))

    assert ("engine.model.path", True) == (info.value.key, f"{path}/{fragment}" in info.value.message)


def test_the_cli_exits_2_in_one_line_on_a_corrupt_generation_config(checkpoint, tmp_path, capsys):
    path = _spoiled(checkpoint, tmp_path, "{not json")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"engine": {"model": {"path": str(path)}, "runtime": "cpu"},
                                   "workload": {"name": "synthetic", "num_requests": 2}}))

    code = main(["--log-level", "warning", "run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])

    err = capsys.readouterr().err
    assert (2, 1) == (code, len(err.splitlines()))
    assert err.startswith(f"asyncbatch: config error: engine.model.path: {path}/generation_config.json is unreadable")


@pytest.mark.parametrize("eos", [2, [2, 7], None])
def test_a_good_generation_config_still_loads(eos, checkpoint, tmp_path, tiny32):
    path = _spoiled(checkpoint, tmp_path, json.dumps({"eos_token_id": eos}))
    engine = Engine.from_config(EngineConfig.from_dict({"model": {"path": str(path)}, "runtime": "cpu"}))
    want = eos if eos is not None else tiny32.config.eos_token_id  # none here: the config's
    assert tuple(want if isinstance(want, list) else [want]) == engine.eos_ids
