"""A sweep cell with `engine.cache.num_blocks` below 2 is refused when the experiment is loaded, like every other
bad cell value, not after the earlier cells ran (exit 2, no result directory)."""

from __future__ import annotations

import yaml

from asyncbatch.cli import main


def test_a_cell_with_one_kv_block_fails_before_any_cell_runs(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({
        "engine": {"model": {"preset": "tiny", "dtype": "float32"}, "runtime": "cpu",
                   "batch": {"max_tokens": 64, "max_seqs": 4}},
        "workload": {"name": "synthetic", "num_requests": 2, "prompt_len": {"dist": "fixed", "value": 4},
                     "output_len": {"dist": "fixed", "value": 2}},
        "sweep": {"engine.cache.num_blocks": [64, 1]}, "output": {"plots": False}}))

    code = main(["--log-level", "warning", "run", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])

    out, err = capsys.readouterr()
    assert (2, "", False) == (code, out, (tmp_path / "out").exists())
    assert "engine.cache.num_blocks" in err and "needs at least 2" in err and "got 1" in err
