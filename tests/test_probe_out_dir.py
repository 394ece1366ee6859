"""A result directory that cannot be created (its parent is a file, or read-only) is a config error naming the
option (exit 2), found before anything runs: never an internal error, and never after a benchmark's requests."""

from __future__ import annotations

import json

from asyncbatch.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["--log-level", "warning", *argv])
    return code, capsys.readouterr().err


def test_run_with_an_out_dir_that_cannot_be_made(tmp_path, capsys):
    (tmp_path / "file").write_text("")

    code, err = _run(capsys, "run", "--set", "workload.num_requests=1", "--no-progress",
                     "--out", str(tmp_path / "file" / "sub"))
    code_dir, err_dir = _run(capsys, "run", "--set", "workload.num_requests=1", "--no-progress",
                             "--set", f"output.dir={tmp_path / 'file'}")

    assert 2 == code and f"config error: --out: cannot create the directory {tmp_path}/file/sub" in err
    assert 2 == code_dir and "config error: output.dir: cannot create the directory" in err_dir


def test_compare_with_an_out_dir_that_cannot_be_made(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    run = tmp_path / "run"
    assert 0 == main(["--log-level", "warning", "run", "--set", "workload.num_requests=1", "--no-progress",
                      "--set", "output.plots=false", "--out", str(run)])

    code, err = _run(capsys, "compare", str(run), str(run), "--out", str(tmp_path / "file" / "sub"))

    assert 2 == code and "config error: --out: cannot create the directory" in err


def test_bench_serve_checks_its_output_dir_before_sending_requests(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")

    # Port 9 (discard): nothing answers, so a bench that sent its requests first would fail them all.
    code, err = _run(capsys, "bench-serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset",
                     str(data), "--no-plots", "--timeout", "2", "--output", str(tmp_path / "file" / "sub"))

    assert 2 == code and "config error: --output: cannot create the directory" in err
