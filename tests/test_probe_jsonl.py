"""The `jsonl` workload on files nobody tuned for: a malformed row is a config error naming the file and its line
(exit 2, never an internal error), and a bad `max_new_tokens` fails its own request while the others run."""

from __future__ import annotations

import json

import pytest

from asyncbatch.cli import main
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.types import SamplingParams
from asyncbatch.plugins.workloads import JsonlConfig, JsonlPrompts
from asyncbatch.serve.bench_workload import read_dataset


def _requests(path, limit=None):
    return JsonlPrompts(JsonlConfig(path=str(path), limit=limit), vocab_size=512).requests(SamplingParams())


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt_ids": [1, 2]}', "3"], ":2: expected a JSON object, got int"),
    (['{"prompt_ids": [1, 2]}', '"prompt me"'], ":2: expected a JSON object, got str"),
    (['{"prompt_ids": 5}'], ":1: prompt_ids must be a list of token ids, got 5"),
    (['{"prompt_ids": null}'], ":1: prompt_ids must be a list of token ids, got None"),
    (['{"prompt": 5}'], ":1: prompt must be a string, got 5"),
    (['{"prompt_ids": [1]}', "", "", '{"nope": 1}'], ":4: needs 'prompt' or 'prompt_ids'"),  # the file's line
])
def test_a_malformed_row_is_a_config_error_naming_its_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(ConfigError) as info:
        _requests(path)

    assert "workload.path" == info.value.key
    assert f"{path}{message}" in str(info.value)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xff\xfe{"prompt_ids": [1]}\n')

    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        _requests(path)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_dataset(str(path), None, 8, "--dataset")


def test_a_bad_max_new_tokens_fails_its_request_alone(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt_ids": [1, 2], "max_new_tokens": "x"}, {"prompt_ids": [3, 4], "max_new_tokens": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"

    code = main(["--log-level", "warning", "run", "--set", f"workload={{name: jsonl, path: {path}}}",
                 "--set", "output.plots=false", "--out", str(out)])

    assert 0 == code, capsys.readouterr().err
    outputs = json.loads((out / "results.json").read_text())["outputs"]
    assert [("error", 0), ("length", 3)] == [(o["finish_reason"], o["output_tokens"]) for o in outputs]
    assert outputs[0]["error"].startswith("max_new_tokens must be >= 1")
