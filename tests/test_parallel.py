"""Scale-out on the CPU: gloo processes started by `asyncbatch run`, as data-parallel replicas or tensor-parallel
shards, give exactly the tokens of one process; a rank that dies or hangs fails the run with a message naming it,
never a hang; the router shares requests by least outstanding tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ExperimentConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.stats import RunContext
from asyncbatch.parallel.launch import launch
from asyncbatch.parallel.replicas import run_replicated
from asyncbatch.parallel.router import assign
from asyncbatch.plugins.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "workload.num_requests=24", "--set", "workload.output_len={dist: uniform, min: 4, max: 24}",
         "--set", "output.plots=false"]


@given(st.lists(st.integers(1, 500), max_size=60), st.integers(1, 6))
def test_the_router_assigns_every_request_once_and_balances_tokens(costs, replicas):
    owners = assign(costs, replicas)

    assert len(costs) == len(owners) and all(0 <= o < replicas for o in owners)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(replicas)]
    assert max(load) - min(load) <= max(costs, default=0)
    assert owners == assign(costs, replicas)  # every rank computes the same assignment


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncbatch", "run", str(ROOT / "configs/default.yaml"),
                           "--no-progress", *args], capture_output=True, text=True, timeout=300, **kwargs)


def _tokens(out: Path) -> list[str]:
    return [o["tokens_sha1"] for o in json.loads((out / "results.json").read_text())["outputs"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    done = _cli("--out", str(out), *SMALL, "--set", "sampling.temperature=0.7")
    assert 0 == done.returncode, done.stderr
    return _tokens(out)


@pytest.mark.parametrize("nproc", [2, 4])
def test_replicas_give_exactly_the_tokens_of_one_process(tmp_path, single, nproc):
    """Greedy and sampled alike (float32, tiny model): sampling seeds come from request ids, not positions."""
    out = tmp_path / "run"
    done = _cli("--out", str(out), "--nproc", str(nproc), *SMALL, "--set", "sampling.temperature=0.7")

    assert 0 == done.returncode, done.stderr
    assert single == _tokens(out)
    ranks = json.loads((out / "results.json").read_text())["ranks"]
    assert list(range(nproc)) == [r["rank"] for r in ranks]
    assert 24 == sum(r["num_requests"] for r in ranks)


@pytest.mark.parametrize("preset,tensor,extra", [
    ("tiny", 2, []), ("tiny-qwen2", 2, []), ("tiny-qwen3", 2, []), ("tiny-mistral", 2, []),
    ("tiny", 4, ["--set", "engine.model.overrides={num_key_value_heads: 4}"]),
    ("tiny-qwen2", 2, ["--set", "engine.parallel.shard_lm_head=false"]),
    ("tiny", 4, ["--set", "engine.model.overrides={num_key_value_heads: 4, vocab_size: 509, tie_word_embeddings: true}"]),
])
def test_tensor_parallel_ranks_give_exactly_the_tokens_of_one_process(tmp_path, preset, tensor, extra):
    """Heads and MLP features split over gloo processes (float32): qkv biases (qwen2), per-head norms (qwen3) and
    a sliding window (mistral) included; the output head split by vocabulary too (`shard_lm_head`, the default),
    also where the vocabulary does not divide by the ranks and the head shares its weight with the embedding, and
    kept whole on request."""
    args = [*SMALL, "--set", f"engine.model.preset={preset}", *extra]
    assert 0 == _cli("--out", str(tmp_path / "one"), *args).returncode

    done = _cli("--out", str(tmp_path / "tp"), "--set", f"engine.parallel.tensor={tensor}", *args)

    assert 0 == done.returncode, done.stderr
    assert _tokens(tmp_path / "one") == _tokens(tmp_path / "tp")
    ranks = json.loads((tmp_path / "tp" / "results.json").read_text())["ranks"]
    assert [(r, 0, 24) for r in range(tensor)] == [(r["rank"], r["replica"], r["num_requests"]) for r in ranks]
    split = "lm_head split by vocabulary: rows " in (tmp_path / "tp" / "ranks" / "rank1.log").read_text()
    assert ("engine.parallel.shard_lm_head=false" not in extra) == split


def test_compiled_shards_compile_once_for_every_layer(tmp_path):
    """torch.compile guards a compiled layer on the classes and objects it touches: the row-parallel layers of
    every decoder layer share one class and one reducer, so adding layers adds no compilation (with one each, every
    layer recompiled and, past the recompile limit, all of them ran eagerly)."""
    env = {**os.environ, "TORCH_LOGS": "recompiles"}

    def recompiles(layers: int) -> int:
        out = tmp_path / f"l{layers}"
        done = _cli("--out", str(out), "--set", "workload.num_requests=4", "--set", "output.plots=false",
                    "--set", "engine.parallel.tensor=2", "--set", "engine.compile=layers",
                    "--set", f"engine.model.overrides={{num_hidden_layers: {layers}}}", env=env)
        assert 0 == done.returncode, done.stderr[-3000:]
        return (out / "ranks" / "rank1.log").read_text().count("Recompiling function")

    assert recompiles(2) == recompiles(6)


def test_replicas_of_tensor_parallel_groups_give_exactly_the_tokens_of_one_process(tmp_path, single):
    """Data parallelism over tensor-parallel groups: 4 processes, 2 replicas of 2 shards each."""
    out = tmp_path / "run"
    done = _cli("--out", str(out), "--nproc", "4", "--set", "engine.parallel.tensor=2", *SMALL,
                "--set", "sampling.temperature=0.7")

    assert 0 == done.returncode, done.stderr
    assert single == _tokens(out)
    ranks = json.loads((out / "results.json").read_text())["ranks"]
    assert [0, 0, 1, 1] == [r["replica"] for r in ranks]
    assert ranks[0]["num_requests"] + ranks[2]["num_requests"] == 24
    assert ranks[0]["num_requests"] == ranks[1]["num_requests"]


def test_per_head_qk_norms_split_with_their_heads_and_norms_over_all_heads_are_refused(tmp_path):
    """Cohere's q/k norms hold a row of weights per head: each rank keeps its heads' rows and gives the tokens of
    one process. OLMo 2 normalises q and k over all heads at once, which no rank can: refused, naming why."""
    import torch
    import transformers as t
    from transformers import AutoModelForCausalLM

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.2, eos_token_id=2)
    for name, config in (("cohere", t.CohereConfig(**sizes, use_qk_norm=True)), ("olmo2", t.Olmo2Config(**sizes))):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / name)
    cohere = [*SMALL, "--set", f"engine.model.path={tmp_path / 'cohere'}"]
    assert 0 == _cli("--out", str(tmp_path / "one"), *cohere).returncode

    split = _cli("--out", str(tmp_path / "tp"), "--set", "engine.parallel.tensor=2", *cohere)
    olmo = _cli("--out", str(tmp_path / "o"), "--set", "engine.parallel.tensor=2", *SMALL,
                "--set", f"engine.model.path={tmp_path / 'olmo2'}")

    assert 0 == split.returncode, split.stderr
    assert _tokens(tmp_path / "one") == _tokens(tmp_path / "tp")
    assert 1 == olmo.returncode
    assert "olmo2 normalises its q projection over all heads at once (q_norm weight (64,))" in olmo.stderr


@pytest.mark.parametrize("split", [["--nproc", "2"], ["--set", "engine.parallel.tensor=2"]], ids=["data", "tensor"])
def test_a_killed_rank_fails_the_run_and_is_named(tmp_path, split):
    out = tmp_path / "run"
    long = ["--set", "workload.num_requests=400", "--set", "workload.output_len={dist: fixed, value: 200}"]
    proc = subprocess.Popen([sys.executable, "-m", "asyncbatch", "run", str(ROOT / "configs/default.yaml"),
                             "--no-progress", "--out", str(out), *split, *long],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = out / "ranks" / "pids.json"
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(4)  # into model building or the run
    os.kill(json.loads(pids.read_text())["1"], signal.SIGKILL)

    _, err = proc.communicate(timeout=120)

    assert 1 == proc.returncode
    assert "rank 1 of 2 was killed by SIGKILL" in err


def test_the_launcher_names_the_killed_rank_before_the_ones_that_lost_it():
    """A rank killed from outside is the cause; a peer that then aborts (gloo gives up with SIGABRT) or exits with
    an error only followed it, whatever their ranks."""
    from asyncbatch.parallel.launch import blame_order

    ended = [(0, -signal.SIGABRT), (2, 1), (1, -signal.SIGKILL), (3, -signal.SIGABRT)]

    assert [(1, -signal.SIGKILL), (0, -signal.SIGABRT), (3, -signal.SIGABRT), (2, 1)] == sorted(ended,
                                                                                              key=blame_order)


def test_a_stopped_rank_times_out_instead_of_hanging(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "asyncbatch", "run", str(ROOT / "configs/default.yaml"),
                             "--no-progress", "--out", str(out), "--nproc", "2", "--set", "engine.parallel.timeout_s=5",
                             *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = out / "ranks" / "pids.json"
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(json.loads(pids.read_text())["1"], signal.SIGSTOP)  # before it can join the group

    start = time.monotonic()
    _, err = proc.communicate(timeout=120)

    assert 1 == proc.returncode
    assert "rank 0 of 2 exited with code 1 (rank 1 was still running (stopped or hung?))" in err
    assert time.monotonic() - start < 60


def _ranks(tmp_path, code: str, nproc: int = 2) -> tuple[int, str]:
    log = tmp_path / "err.txt"
    with open(log, "w") as f:
        old, sys.stderr = sys.stderr, f
        try:
            rc = launch([sys.executable, "-c", code], nproc, log_dir=tmp_path / "ranks")
        finally:
            sys.stderr = old
    return rc, log.read_text()


def test_the_launcher_names_a_rank_that_exits_with_an_error(tmp_path):
    rc, err = _ranks(tmp_path, "import os, sys, time; r = int(os.environ['RANK']); print('boom', r); "
                               "sys.exit(3 if r == 1 else time.sleep(30))")

    assert 1 == rc
    assert "rank 1 of 2 exited with code 3 (rank 0 was still running (stopped or hung?))" in err
    assert "boom 1" in err  # the end of its log


def test_the_launcher_returns_0_when_every_rank_succeeds(tmp_path):
    rc, err = _ranks(tmp_path, "import os; assert os.environ['WORLD_SIZE'] == '3'", nproc=3)

    assert (0, "") == (rc, err)


def test_nproc_must_hold_whole_tensor_parallel_replicas(tmp_path):
    done = _cli("--out", str(tmp_path / "x"), "--nproc", "3", "--set", "engine.parallel.tensor=2")

    assert 2 == done.returncode
    assert "--nproc: 3 processes cannot hold replicas of engine.parallel.tensor=2 ranks" in done.stderr


@pytest.mark.parametrize("kind", ["one_shot", "lamport"])
def test_a_one_shot_all_reduce_is_refused_on_the_cpu_by_every_rank_with_the_reason(tmp_path, kind):
    done = _cli("--out", str(tmp_path / "tp"), "--set", "engine.parallel.tensor=2", "--set",
                f"engine.parallel.all_reduce={kind}", *SMALL)

    assert 1 == done.returncode
    assert f"engine.parallel.all_reduce={kind}: it needs CUDA devices (use auto or nccl)" in done.stderr
    assert "still running" not in done.stderr  # both ranks stopped on their own: no hang, no timeout


def test_the_one_shot_all_reduce_is_one_opaque_op_to_torch_compile():
    """Inductor must not move the symmetric buffer or copy it into memory of its own: the op is a custom op whose
    fake gives a fresh tensor of the input's shape, so a compiled layer traces it without a graph break."""
    import torch

    from asyncbatch.parallel.all_reduce import _register_op

    _register_op()
    _register_op()  # idempotent: engines of one process share it
    with torch._subclasses.fake_tensor.FakeTensorMode():
        y = torch.empty(3, 8, dtype=torch.bfloat16)
        out = torch.ops.asyncbatch.one_shot_all_reduce(y, "group")

    assert ((3, 8), torch.bfloat16) == (tuple(out.shape), out.dtype)


def test_parallel_settings_are_checked():
    with pytest.raises(ConfigError, match="engine.parallel.data"):
        ExperimentConfig.from_dict({"engine": {"parallel": {"data": 0}}})
    with pytest.raises(ConfigError, match="sweep.engine.parallel.data"):
        ExperimentConfig.from_dict({"sweep": {"engine.parallel.data": [1, 2]}}).sweep_cells()
    with pytest.raises(ConfigError, match="engine.parallel.all_reduce.*auto, lamport, nccl, one_shot"):
        ExperimentConfig.from_dict({"engine": {"parallel": {"all_reduce": "ring"}}})
    outside = ExperimentConfig.from_dict({"engine": {"parallel": {"data": 2}}})
    with pytest.raises(ConfigError, match="2 ranks configured .* not part of a launched world"):
        run_experiment(outside, echo=lambda _: None)


class _FakeWorld:
    """A rank of a tensor-parallel group of two (one replica) whose collectives only record what it sends."""

    def __init__(self, rank: int) -> None:
        self.rank, self.data, self.tensor = rank, 1, 2
        self.replica, self.tp_rank = 0, rank
        self.sent: list = []

    def barrier(self) -> None:
        pass

    def gather(self, obj):
        self.sent.append(obj)
        return None


def test_a_tensor_parallel_groups_other_ranks_send_rank_0_only_their_summary(tiny32):
    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))
    requests = engine.make_requests([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4))
    sent = {}
    for rank in (0, 1):
        world = _FakeWorld(rank)
        run_replicated(engine, requests, world, context=RunContext(config={}))
        ((indices, part),) = world.sent
        sent[rank] = (indices, len(part.outputs), len(part.steps) > 0, part.summary.generated_tokens)

    assert {0: ([0, 1], 2, True, 8), 1: ([0, 1], 0, False, 8)} == sent
