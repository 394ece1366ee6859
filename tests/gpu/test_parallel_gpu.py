"""Scale-out on several GPUs, the way users start it (`asyncbatch run --nproc N`): NCCL and both one-shot
(symmetric-memory: `one_shot`, `lamport`) all-reduces inside captured CUDA graphs, eager and compiled, with the output head whole or split
by vocabulary, give the tokens of one GPU (float32, greedy); data parallelism over tensor-parallel groups too.
Skipped with fewer than two (or four) cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs two CUDA devices")]

SMALL = ["--set", "engine.model={preset: small, dtype: float32, device: cuda}", "--set", "engine.runtime=cuda",
         "--set", "workload.num_requests=24", "--set", "workload.output_len={dist: uniform, min: 8, max: 48}",
         "--set", "engine.batch={max_tokens: 512, max_seqs: 16}", "--set", "engine.cache.num_blocks=2048",
         "--set", "output.plots=false"]


def _run(out: Path, *args: str) -> tuple[list[str], dict]:
    done = subprocess.run([sys.executable, "-m", "asyncbatch", "run", str(ROOT / "configs/default.yaml"),
                           "--no-progress", "--out", str(out), *SMALL, *args], capture_output=True, text=True,
                          timeout=600)
    assert 0 == done.returncode, done.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    return [o["tokens_sha1"] for o in res["outputs"]], res


_ONE_GPU: dict[tuple[str, str], list[str]] = {}


@pytest.mark.parametrize(("graphs", "compile_mode", "all_reduce", "head"), [
    ("per_slot", "layers", "one_shot", False), ("per_slot", "layers", "nccl", False),
    ("eager", "none", "one_shot", False), ("eager", "none", "nccl", False), ("per_slot", "none", "one_shot", False),
    ("eager", "layers", "nccl", False), ("per_slot", "layers", "one_shot", True), ("eager", "none", "nccl", True),
    ("per_slot", "layers", "lamport", False), ("eager", "none", "lamport", False), ("per_slot", "none", "lamport", True)])
def test_tensor_parallel_on_two_gpus_gives_the_tokens_of_one(tmp_path, graphs, compile_mode, all_reduce, head):
    """`head`: the output head split by vocabulary too (`engine.parallel.shard_lm_head`: the logits' all-gather
    captured in the step graphs)."""
    args = ["--set", f"engine.graphs={graphs}", "--set", f"engine.compile={compile_mode}"]
    if (graphs, compile_mode) not in _ONE_GPU:
        _ONE_GPU[graphs, compile_mode] = _run(tmp_path / "one", *args)[0]

    two, res = _run(tmp_path / "two", "--set", "engine.parallel.tensor=2", "--set",
                    f"engine.parallel.all_reduce={all_reduce}", "--set",
                    f"engine.parallel.shard_lm_head={str(head).lower()}", *args)

    assert _ONE_GPU[graphs, compile_mode] == two
    assert [0, 1] == [r["rank"] for r in res["ranks"]]
    assert all(r["compute_busy_fraction"] > 0 for r in res["ranks"])
    log = (tmp_path / "two" / "ranks" / "rank1.log").read_text()  # rank 0 writes to the terminal
    assert f"tensor-parallel all-reduce: {all_reduce}" in log
    assert head == ("lm_head split by vocabulary" in log)


@pytest.mark.skipif(GPUS < 4, reason="needs four CUDA devices")
def test_replicas_of_tensor_parallel_groups_on_four_gpus_give_the_tokens_of_one(tmp_path):
    one, _ = _run(tmp_path / "one")

    four, res = _run(tmp_path / "four", "--nproc", "4", "--set", "engine.parallel.tensor=2")

    assert one == four
    assert [0, 0, 1, 1] == [r["replica"] for r in res["ranks"]]
