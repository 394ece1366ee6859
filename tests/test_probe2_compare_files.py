"""`asyncbatch compare` on result files of another shape (a field missing or of the wrong type, a metric that is
not a number): a config error naming the file (exit 2), never an internal error."""

from __future__ import annotations

import json

import pytest

from asyncbatch.cli import main

BAD = {
    "summary_null": ("results.json", {"summary": None}, "results.json: not asyncbatch results: 'summary' is "
                                                         "NoneType, not an object"),
    "metric_text": ("results.json", {"summary": {"tokens_per_s": "fast"}},
                    "results.json: not asyncbatch results: metric tok_s is 'fast', not a number"),
    "sweep_no_keys": ("sweep.json", {"rows": []}, "sweep.json: not asyncbatch results: missing field 'keys'"),
    "sweep_row_without_key": ("sweep.json", {"keys": ["x"], "rows": [{"tok_s": 1.0}]},
                              "sweep.json: not asyncbatch results: missing field 'x'"),
    "sweep_rows_null": ("sweep.json", {"keys": ["x"], "rows": None},
                        "sweep.json: not asyncbatch results: 'rows' is NoneType, not a list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_results_file_of_another_shape_is_a_config_error_naming_it(case, tmp_path, capsys):
    name, data, fragment = BAD[case]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / name).write_text(json.dumps(data))
    (b / "results.json").write_text(json.dumps({"summary": {"tokens_per_s": 1.0}}))

    code = main(["--log-level", "warning", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")])

    err = capsys.readouterr().err
    assert (2, 1) == (code, len(err.splitlines()))
    assert err.startswith(f"asyncbatch: config error: {a}/{fragment}")
    assert not (tmp_path / "cmp").exists()


def test_an_aggregate_without_keys_is_a_config_error_naming_it(tmp_path, capsys):
    a = tmp_path / "a"
    a.mkdir()
    (a / "sweep.json").write_text(json.dumps({"keys": [], "rows": []}))
    (a / "aggregate.json").write_text(json.dumps({"rows": []}))

    code = main(["--log-level", "warning", "compare", str(a), str(a), "--out", str(tmp_path / "cmp")])

    assert (2, f"asyncbatch: config error: {a}/aggregate.json: not asyncbatch results: missing field 'keys'\n") == \
        (code, capsys.readouterr().err)
