"""`asyncbatch simulate --out PATH` with a path it cannot write: a config error naming `--out` (exit 2) before the
study runs. It was an internal error after the whole study (its results lost), and `--out ''` wrote nothing,
silently."""

from __future__ import annotations

import json

import pytest

import asyncbatch.plugins.simulate as simulate
from asyncbatch.cli import main

SMALL = ["--steps", "2", "--slots", "1", "--streams", "one", "--graphs", "eager", "--requests", "1"]


@pytest.fixture
def no_study(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the study ran although its output cannot be written")

    monkeypatch.setattr(simulate, "run_study", refuse)


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["--log-level", "warning", "simulate", *SMALL, *argv])
    return code, capsys.readouterr().err.strip()


def test_an_out_path_that_is_a_directory_fails_before_the_study(tmp_path, capsys, monkeypatch, no_study):
    assert (2, f"asyncbatch: config error: --out: {tmp_path} is a directory: give the file to write") == _run(
        capsys, "--out", str(tmp_path))

    monkeypatch.undo()  # the study may run now: a file in new directories below gets it
    out = tmp_path / "a" / "b" / "study.json"
    code, _ = _run(capsys, "--out", str(out))
    assert (0, 1) == (code, len(json.loads(out.read_text())["rows"]))


def test_an_out_path_below_a_file_fails_before_the_study(tmp_path, capsys, no_study):
    (tmp_path / "f").write_text("x")

    code, err = _run(capsys, "--out", str(tmp_path / "f" / "study.json"))

    assert (2, f"asyncbatch: config error: --out: cannot create the directory {tmp_path / 'f'}: ") == (
        code, err[: len(f"asyncbatch: config error: --out: cannot create the directory {tmp_path / 'f'}: ")])


def test_an_empty_out_path_is_refused_not_ignored(capsys, no_study):
    assert (2, "asyncbatch: config error: --out: an empty path: give the file to write") == _run(capsys, "--out", "")

