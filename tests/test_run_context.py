"""Run-level lifecycle hooks and what observers see: `asyncbatch_run_started(context)`,
`asyncbatch_run_finished(summary, context)` (older one-argument implementations keep working), the run context of
a bare engine and of an experiment, failures that lose nothing, and an observer-only plugin installed from a
distribution (listed with its version, recorded in environment.json). CPU only, tiny model, a few tokens."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
import yaml

import asyncbatch
from asyncbatch import Engine, EngineConfig, ExperimentConfig, PluginHost, SamplingParams
from asyncbatch.cli import main
from asyncbatch.core.plugin_host import ENTRY_POINT_GROUP, reset_plugin_host
from asyncbatch.core.stats import RunContext
from asyncbatch.plugins.experiment import run_experiment
from asyncbatch.plugins.sweeps import report_text

ENGINE = {"model": {"preset": "tiny", "dtype": "float32"}, "cache": {"num_blocks": 32},
          "batch": {"max_tokens": 64, "max_seqs": 4}}
EXPERIMENT = {"name": "ctx", "engine": ENGINE, "output": {"plots": False, "progress": False},
              "workload": {"name": "synthetic", "num_requests": 2, "prompt_len": {"dist": "fixed", "value": 4},
                           "output_len": {"dist": "fixed", "value": 2}}}
PROMPTS = [[1, 2, 3], [4, 5, 6, 7]]
PARAMS = SamplingParams(max_new_tokens=3)


class Recorder:
    def __init__(self) -> None:
        self.started: list[RunContext] = []
        self.finished: list[tuple[Any, RunContext]] = []

    @asyncbatch.hookimpl
    def asyncbatch_run_started(self, context: RunContext) -> None:
        self.started.append(context)

    @asyncbatch.hookimpl
    def asyncbatch_run_finished(self, summary: Any, context: RunContext) -> None:
        self.finished.append((summary, context))


class OneArgument:
    """Written against the old spec `asyncbatch_run_finished(summary)`."""

    def __init__(self) -> None:
        self.summaries: list[Any] = []

    @asyncbatch.hookimpl
    def asyncbatch_run_finished(self, summary: Any) -> None:
        self.summaries.append(summary)


class Failing:
    @asyncbatch.hookimpl
    def asyncbatch_run_started(self, context: RunContext) -> None:
        raise RuntimeError("start hook broke")

    @asyncbatch.hookimpl
    def asyncbatch_run_finished(self, summary: Any, context: RunContext) -> None:
        raise RuntimeError("finish hook broke")


class OnlyFinishFails:
    @asyncbatch.hookimpl
    def asyncbatch_run_finished(self, summary: Any) -> None:
        raise RuntimeError("finish hook broke")


class Slow:
    @asyncbatch.hookimpl
    def asyncbatch_run_started(self, context: RunContext) -> None:
        time.sleep(1.0)


def _engine(model: Any, *plugins: object) -> tuple[Engine, PluginHost]:
    host = PluginHost.create(extra_plugins=plugins, load_entry_points=False)
    return Engine(model, EngineConfig.from_dict(ENGINE, host=host), host=host), host


def test_bare_engine_run_gets_the_default_context_and_old_hooks_still_run(tiny32):
    recorder, old = Recorder(), OneArgument()
    engine, _ = _engine(tiny32, recorder, old)
    result = engine.run(engine.make_requests(PROMPTS, PARAMS))
    expected = RunContext(config={"engine": engine.config.to_dict()}, cell=0, assignment={}, repetition=0,
                          out_dir=None, num_requests=2)
    assert [expected] == recorder.started
    assert [(result.summary, expected)] == recorder.finished
    assert recorder.finished[0][1] is recorder.started[0]  # one context per run, the same object in both hooks
    assert [result.summary] == old.summaries
    assert 0 == result.summary.hook_errors
    given = RunContext(config={"engine": {}}, cell=3, assignment={"seed": 1}, num_requests=2)
    engine.run(engine.make_requests(PROMPTS, PARAMS), context=given)
    assert given is recorder.started[1] and given is recorder.finished[1][1]


def test_run_hooks_that_raise_lose_nothing_and_are_reported(tiny32):
    clean, _ = _engine(tiny32)
    reference = clean.generate(PROMPTS, PARAMS)
    recorder = Recorder()
    engine, host = _engine(tiny32, Failing(), recorder)
    result = engine.run(engine.make_requests(PROMPTS, PARAMS))
    assert [o.token_ids for o in reference] == [o.token_ids for o in result.outputs]
    assert 2 == result.summary.hook_errors  # run_started and run_finished: the run's result counts both
    assert [("Failing", "asyncbatch_run_started"), ("Failing", "asyncbatch_run_finished")] == \
        [(e.plugin, e.hook) for e in host.hook_errors]
    assert 1 == len(recorder.started) == len(recorder.finished)  # other plugins still ran
    # What run_finished hooks got: the summary before their own failures, which cannot be known yet.
    assert 1 == recorder.finished[0][0].hook_errors
    assert result.summary is engine.last_result.summary


def test_a_failing_run_finished_hook_is_counted_in_what_the_experiment_writes(tmp_path):
    host = PluginHost.create(extra_plugins=[OnlyFinishFails()], load_entry_points=False)
    cfg = ExperimentConfig.from_dict(EXPERIMENT, host=host)
    result = run_experiment(cfg, tmp_path / "o", host=host, progress=False, echo=lambda _: None)
    written = json.loads((tmp_path / "o" / "results.json").read_text())["summary"]
    assert (1, 1) == (written["hook_errors"], result.cells[0].summary.hook_errors)
    printed = [line.rsplit(None, 1) for line in report_text(result).splitlines() if line.startswith("plugin hook")]
    assert [["plugin hook errors", "1"]] == printed


def test_run_started_is_called_before_the_clock_starts(tiny32):
    engine, _ = _engine(tiny32, Slow())
    result = engine.run(engine.make_requests(PROMPTS, PARAMS))
    assert result.summary.wall_s < 1.0
    assert all(o.token_times[0] < 1.0 for o in result.outputs)


def test_experiment_runs_pass_their_real_context(tmp_path):
    recorder, old = Recorder(), OneArgument()
    host = PluginHost.create(extra_plugins=[recorder, old], load_entry_points=False)
    cfg = ExperimentConfig.from_dict({**EXPERIMENT, "repeat": 2, "sweep": {"engine.buffers": ["single", "double"]}},
                                     host=host)
    result = run_experiment(cfg, tmp_path / "o", host=host, progress=False, echo=lambda _: None)
    seen = [(c.cell, c.repetition, c.assignment, c.out_dir, c.num_requests) for c in recorder.started]
    assert [(cell.index, cell.repetition, cell.assignment, cell.out_dir, 2) for cell in result] == seen
    assert [(0, 0), (0, 1), (1, 0), (1, 1)] == [(c, r) for c, r, *_ in seen]
    for context, cell in zip(recorder.started, result, strict=True):
        assert yaml.safe_load((cell.out_dir / "config.yaml").read_text()) == context.config
    assert [(0, 0), (1, 1), (0, 0), (1, 1)] == [(c.config["seed"], c.config["engine"]["seed"]) for c in recorder.started]
    assert [c.summary for c in result] == [s for s, _ in recorder.finished] == old.summaries
    assert [c for _, c in recorder.finished] == recorder.started


def test_summary_percentiles_and_means():
    from asyncbatch import Output
    from asyncbatch.core.stats import RunSummary

    # TTFTs 0.1 .. 0.5 s; each request's tokens 0.01 s apart after the first, two tokens per request.
    outs = [Output(str(i), (1,), (7, 8), "length", token_times=(0.1 * i + 0.1, 0.1 * i + 0.11), arrival_time=0.0,
                   finish_time=0.1 * i + 0.2) for i in range(5)]
    s = RunSummary.build(outs, [], 1.0, busy_fraction=None, preemptions=0)
    assert (0.3, 0.46, 0.48, 0.496, 0.3) == tuple(round(getattr(s, f"ttft_{q}"), 9)
                                                   for q in ("p50", "p90", "p95", "p99", "mean"))
    assert (0.4, 0.56, 0.58, 0.4) == tuple(round(getattr(s, f"e2e_{q}"), 9) for q in ("p50", "p90", "p95", "mean"))
    assert (0.01, 0.01, 0.01) == tuple(round(getattr(s, f"itl_{q}"), 9) for q in ("p50", "p95", "mean"))
    empty = RunSummary.build([], [], 1.0, busy_fraction=None, preemptions=0)
    assert (None, None, None) == (empty.ttft_p90, empty.itl_p95, empty.e2e_mean)


# ---------------------------------------------------------------- an observer installed from a distribution


OBSERVER = '''\
import json, os

import asyncbatch


@asyncbatch.hookimpl
def asyncbatch_run_started(context):
    with open(os.environ["AB_OBSERVER_LOG"], "a") as fh:
        fh.write(json.dumps({"cell": context.cell, "out_dir": str(context.out_dir)}) + "\\n")


@asyncbatch.hookimpl
def asyncbatch_run_finished(summary):
    with open(os.environ["AB_OBSERVER_LOG"], "a") as fh:
        fh.write(json.dumps({"tokens": summary.generated_tokens}) + "\\n")
'''


@pytest.fixture
def observer_installed(tmp_path, monkeypatch):
    """A distribution `ab-observer` 2.3.4 whose entry point `observer` has lifecycle hooks only."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ab_observer.py").write_text(OBSERVER)
    dist = site / "ab_observer-2.3.4.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ab-observer\nVersion: 2.3.4\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nobserver = ab_observer\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("AB_OBSERVER_LOG", str(tmp_path / "observer.log"))
    reset_plugin_host()
    yield tmp_path / "observer.log"
    reset_plugin_host()
    sys.modules.pop("ab_observer", None)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "warning", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_hook_only_plugins_with_version(capsys, monkeypatch, observer_installed):
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, _ = _cli(capsys, "list")
    assert code == 0
    head, tail = out.split("plugins with lifecycle hooks only (no components):\n")
    assert "observer" not in head  # it registers no component
    assert ["plugin", "version", "hooks"] == tail.splitlines()[0].split()
    rows = [line.split(None, 2) for line in tail.splitlines()[2:]]
    assert [["observer", "2.3.4", "asyncbatch_run_started, asyncbatch_run_finished"]] == rows
    monkeypatch.setenv("COLUMNS", "100")
    _, out, _ = _cli(capsys, "list")
    assert [] == [line for line in out.splitlines() if len(line) > 100]
    assert "observer" in out.split("plugins with lifecycle hooks only")[1]
    _, out, _ = _cli(capsys, "list", "--family", "runtime")  # one family: components only
    assert "lifecycle hooks only" not in out


def test_environment_records_plugins_and_variables(tmp_path, capsys, monkeypatch, observer_installed):
    for name, value in {"ASYNCBATCH_FLAG": "1", "TORCHINDUCTOR_CACHE_DIR": "/tmp/ind", "OMP_NUM_THREADS": "1",
                        "HF_TOKEN": "hf_secret", "NCCL_IB_KEY": "x", "AB_UNRELATED": "2"}.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    code, _, _ = _cli(capsys, "run", str(path), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 0
    env = json.loads((tmp_path / "o" / "environment.json").read_text())
    assert {"value": "ab_observer", "distribution": "ab-observer", "version": "2.3.4", "loaded": True} == \
        env["plugins"]["entry_points"]["observer"]
    assert {"observer", "asyncbatch.plugins.builtin"} <= set(env["plugins"]["loaded"])
    recorded = env["env"]
    assert {"ASYNCBATCH_FLAG": "1", "TORCHINDUCTOR_CACHE_DIR": "/tmp/ind", "OMP_NUM_THREADS": "1"}.items() <= \
        recorded.items()
    assert not {"HF_TOKEN", "NCCL_IB_KEY", "AB_UNRELATED", "AB_OBSERVER_LOG"} & set(recorded)
    # The observer, loaded through its entry point, saw the run's real context and, with the old signature, its
    # summary.
    lines = [json.loads(line) for line in observer_installed.read_text().splitlines()]
    assert [{"cell": 0, "out_dir": str(tmp_path / "o")}, {"tokens": 4}] == lines


def test_relevant_env_keeps_values_and_drops_secrets():
    from asyncbatch.plugins.environment import relevant_env

    environ = {"CUDA_VISIBLE_DEVICES": "0,1", "MKL_NUM_THREADS": "2", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments",
               "TORCH_LOGS": "+dynamo", "TRITON_CACHE_DIR": "/c", "NCCL_DEBUG": "INFO", "HF_HOME": "/hf",
               "HF_TOKEN": "t", "HUGGING_FACE_HUB_TOKEN": "t", "ASYNCBATCH_API_KEY": "k", "TORCH_SECRET": "s",
               "NCCL_PASSWORD": "p", "PATH": "/bin", "HOME": "/root", "CUDA_HOME": "/cuda"}
    assert {"CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/hf", "MKL_NUM_THREADS": "2", "NCCL_DEBUG": "INFO",
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments", "TORCH_LOGS": "+dynamo",
            "TRITON_CACHE_DIR": "/c"} == relevant_env(environ)


def test_cpu_of_other_threads_is_counted_apart_from_the_callers():
    import hashlib
    import threading
    import time

    from asyncbatch.core.stats import cpu_outside_thread, cpu_times

    data = bytes(64 << 20)
    own: list[float] = []

    def work():  # hashing a large buffer releases the GIL: CPU time of another thread, not this one's
        start = time.thread_time()
        for _ in range(4):
            hashlib.sha256(data).digest()
        own.append(time.thread_time() - start)

    since = cpu_times()
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    other = cpu_outside_thread(since)
    assert own[0] > 0.02
    assert own[0] * 0.9 <= other <= own[0] + 0.05 + (time.thread_time() - since[0])


def test_a_run_reports_the_other_threads_cpu_per_step(tiny32):
    from asyncbatch import Engine, EngineConfig, SamplingParams
    from asyncbatch.core.stats import RunSummary

    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu"}))
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    summary = engine.last_result.summary
    steps = engine.last_result.steps
    assert 0.5 / len(steps) * 1e3 == RunSummary.build([], steps, 1.0, busy_fraction=None, preemptions=0,
                                                      cpu_outside_loop_s=0.5).cpu_outside_loop_ms
    assert summary.steps > 0 and summary.cpu_outside_loop_ms is not None and summary.cpu_outside_loop_ms >= 0
