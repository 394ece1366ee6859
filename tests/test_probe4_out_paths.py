"""Where `asyncbatch run` writes, given paths nobody tuned for.

- `--trace PATH` that cannot be written (below a file, a directory, an empty string) was found only after the
  whole run: an internal error, exit 1 (an empty path was ignored, silently: no trace, exit 0). It is now a config
  error naming `--trace`, before the run, like `simulate --out`.
- A long experiment `name`, or a sweep whose values are long (a list of stop tokens, a length distribution),
  made a directory name past the file system's 255 bytes: an internal error (`File name too long`), the sweep's
  cells after the first never run. Names are now bounded, the head kept and a digest of the whole appended, so
  distinct cells (and repetitions) keep distinct directories.
- An `--out` or `output.dir` path too long to look at was an internal error; it is a config error naming the key.
- `bench-serve --output` into a file or a non-empty directory was refused naming `--out`, an option
  `bench-serve` does not have.
"""

from __future__ import annotations

import json

import pytest

import asyncbatch.plugins.experiment as experiment
from asyncbatch.cli import main
from asyncbatch.plugins.report import slug

SLUG_MAX = 100  # report.SLUG_MAX: a file name's 255 bytes hold it with a timestamp or a cell's number

SMALL = ["--set", "workload.num_requests=1", "--set", "workload.prompt_len=4", "--set", "workload.output_len=2",
         "--set", "engine.cache.num_blocks=16", "--set", "output.plots=false", "--no-progress"]


@pytest.fixture
def no_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run started although its trace cannot be written")

    monkeypatch.setattr(experiment, "run_cell", refuse)


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["--log-level", "warning", *argv])
    return code, capsys.readouterr().err.strip()


def test_a_trace_path_that_cannot_be_written_fails_before_the_run(tmp_path, capsys, no_run):
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "out")

    below_a_file = _run(capsys, "run", *SMALL, "--out", out, "--trace", str(tmp_path / "file" / "t.json"))
    a_directory = _run(capsys, "run", *SMALL, "--out", out, "--trace", str(tmp_path))
    empty = _run(capsys, "run", *SMALL, "--out", out, "--trace", "")

    assert (2, f"asyncbatch: config error: --trace: cannot create the directory {tmp_path}/file: File exists") \
        == below_a_file
    assert (2, f"asyncbatch: config error: --trace: {tmp_path} is a directory: give the file to write") == a_directory
    assert (2, "asyncbatch: config error: --trace: an empty path: give the file to write") == empty
    assert not (tmp_path / "out").exists()


def test_a_trace_path_in_new_directories_is_written(tmp_path, capsys):
    trace = tmp_path / "a" / "b" / "t.json"

    code, _ = _run(capsys, "run", *SMALL, "--out", str(tmp_path / "out"), "--trace", str(trace))

    assert (0, True) == (code, bool(json.loads(trace.read_text())["traceEvents"]))


def test_a_long_experiment_name_still_gets_its_result_directory(tmp_path, capsys):
    code, _ = _run(capsys, "run", *SMALL, "--set", "name=" + "n" * 300, "--set", f"output.dir={tmp_path}")

    (made,) = tmp_path.iterdir()
    assert 0 == code
    assert made.name.startswith(slug("n" * 300) + "-") and (made / "results.json").is_file()


def test_a_sweep_of_long_values_runs_every_cell_in_a_directory_of_its_own(tmp_path, capsys):
    stops = [list(range(1, 81)), list(range(2, 82))]  # the same 250-character head in a cell's label
    out = tmp_path / "out"

    code, err = _run(capsys, "run", *SMALL, "--set", f"sweep={{sampling.stop_token_ids: {json.dumps(stops)}}}",
                     "--set", "repeat=2", "--out", str(out))

    names = sorted(p.name for p in (out / "cells").iterdir())
    assert 0 == code, err
    assert 4 == len(names) == len({n[:3] + n[-8:] for n in names})  # cells and repetitions apart
    assert all(len(n) <= SLUG_MAX + 3 and (out / "cells" / n / "results.json").is_file() for n in names)


def test_slugs_within_the_bound_are_unchanged_and_longer_ones_stay_distinct():
    short = "x" * SLUG_MAX

    assert (short, "buffers=single_rep=1") == (slug(short), slug("buffers=single, rep=1"))
    assert SLUG_MAX == len(slug(short + "a")) == len(slug(short + "b"))
    assert slug(short + "a") != slug(short + "b")


def test_out_paths_too_long_to_look_at_are_config_errors_naming_the_key(tmp_path, capsys, no_run):
    long = str(tmp_path / ("d" * 300))

    code_out, err_out = _run(capsys, "run", *SMALL, "--out", long)
    code_dir, err_dir = _run(capsys, "run", *SMALL, "--set", f"output.dir={long}")

    assert (2, f"asyncbatch: config error: --out: cannot use {long}: File name too long") == (code_out, err_out)
    assert (2, True) == (code_dir, err_dir.startswith(f"asyncbatch: config error: output.dir: cannot use {long}/"))


def test_bench_serve_names_its_own_output_option(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    bench = ["bench-serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset", str(data),
             "--no-plots", "--timeout", "2"]

    a_file = _run(capsys, *bench, "--output", str(tmp_path / "file"))
    not_empty = _run(capsys, *bench, "--output", str(tmp_path / "full"))

    assert (2, f"asyncbatch: config error: --output: {tmp_path}/file exists and is not a directory") == a_file
    assert (2, True) == (not_empty[0], not_empty[1].startswith(
        f"asyncbatch: config error: --output: {tmp_path}/full exists and is not empty"))


def test_an_empty_out_path_is_refused_not_read_as_the_current_directory(capsys, no_run):
    assert (2, "asyncbatch: config error: --out: an empty path: give the directory to write") == _run(
        capsys, "run", *SMALL, "--out", "")
