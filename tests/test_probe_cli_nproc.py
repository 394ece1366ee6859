"""`asyncbatch run --nproc N` takes N >= 1: 0 is refused like any other count below one (it was silently ignored,
and the run went ahead in one process)."""

from __future__ import annotations

import pytest

from asyncbatch.cli import main


@pytest.mark.parametrize("n", ["0", "-1"])
def test_nproc_below_one_is_a_config_error_naming_the_option(tmp_path, capsys, n):
    code = main(["--log-level", "warning", "run", "--nproc", n, "--set", "workload.num_requests=1", "--no-progress",
                 "--out", str(tmp_path / "out")])

    assert 2 == code
    assert f"config error: --nproc: must be >= 1 (processes in all), got {n}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
