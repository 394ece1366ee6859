"""The experiment's `sampling:` section with a stop token outside the model's vocabulary.

The section is configuration, and bad configuration is promised to fail at load time naming the dotted key. A
stop token id past the vocabulary is known to be bad once the cell's model config is made, which `asyncbatch run`
already does for every cell before it runs anything; today the run builds the model, fails every request with
`stop token 99999 is outside the vocabulary [0, 512)`, writes the results and exits 1 (a sweep runs every cell
that way)."""

from __future__ import annotations

from asyncbatch.cli import main


def test_a_stop_token_outside_the_vocabulary_is_a_config_error_at_load(tmp_path, capsys):
    out = tmp_path / "run"

    code = main(["--log-level", "warning", "run", "--set", "sampling.stop_token_ids=[99999]",
                 "--set", "workload.num_requests=2", "--set", "output.plots=false", "--out", str(out)])

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (2, "asyncbatch: config error: sampling.stop_token_ids: stop token 99999 is outside the vocabulary "
               "[0, 512)", False) == (code, err, out.exists())
