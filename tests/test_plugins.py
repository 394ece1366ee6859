"""Plugins: entry-point discovery of a real third-party package, custom schedulers, and failure isolation.

CPU only. One tiny model is built per module and shared by the engines that do not come from YAML; it is float64
because tokens are compared across schedulers (batch shapes differ, so float32 rounding could flip an argmax).
The example package (examples/asyncbatch-example-plugin) is never installed globally: tests "install" it into
tmp_path (a copy of its sources next to a hand-written dist-info whose entry points come from its pyproject.toml,
or a real `pip install --target`) and put that directory on sys.path for one test only.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest

import asyncbatch
from asyncbatch import Engine, EngineConfig, ExperimentConfig, PluginError, PluginHost, SamplingParams
from asyncbatch.core.plugin_host import ENTRY_POINT_GROUP, get_plugin_host, reset_plugin_host

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "asyncbatch-example-plugin"
PKG = "asyncbatch_example_plugin"

# Small enough to be fast, tight enough (4 rows, 64 tokens) that requests wait and prompts are split.
ENGINE = {
    "model": {"preset": "tiny", "dtype": "float64"},  # documentation only: engines wrap `tiny_model`
    "cache": {"block_size": 16, "num_blocks": 64},
    "batch": {"max_tokens": 64, "max_seqs": 4},
}
GREEDY = SamplingParams(max_new_tokens=6)  # temperature 0, no stop tokens: every request runs to `length`


# ---------------------------------------------------------------- helpers and fixtures


def _prompts(n: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def _forget_example() -> None:
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def _engine(model: Any, host: PluginHost, **overrides: Any) -> Engine:
    return Engine(model, EngineConfig.from_dict({**ENGINE, **overrides}, host=host), host=host)


def _installed_names() -> set[str]:
    return {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _write_dist(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: what `pip install` leaves for importlib.metadata to find."""
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   "Requires-Dist: asyncbatch\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (dist / "top_level.txt").write_text(name.replace("-", "_") + "\n")


def _example_project() -> dict[str, Any]:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]


def _install_example(site: Path) -> None:
    """Lay the example out in `site` as an install would: its package, and metadata declaring the entry points
    its pyproject.toml declares."""
    project = _example_project()
    shutil.copytree(EXAMPLE / "src" / PKG, site / PKG, ignore=shutil.ignore_patterns("__pycache__"))
    _write_dist(site, project["name"], project["version"], project["entry-points"][ENTRY_POINT_GROUP])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A tiny model gains nothing from intra-op threads; on a busy small machine they cost 20-60x per step
    (measured: 7 ms vs 150-450 ms per step on 2 loaded cores). Restored after this module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    from asyncbatch.core.config import ModelConfig
    from asyncbatch.core.models import build_model

    model, _ = build_model(ModelConfig(preset="tiny", dtype="float64", device="cpu"),
                           PluginHost.create(load_entry_points=False))
    return model


@pytest.fixture(scope="module")
def fifo_tokens(tiny_model: Any) -> list[tuple[int, ...]]:
    """Reference greedy tokens of `_prompts()` under fifo and the default pipeline, with no plugin loaded."""
    host = PluginHost.create(load_entry_points=False)
    outputs = _engine(tiny_model, host).generate(_prompts(), GREEDY)
    assert [o.finish_reason for o in outputs] == ["length"] * len(outputs)
    return [o.token_ids for o in outputs]


@pytest.fixture
def fresh_default_host():
    reset_plugin_host()
    yield
    reset_plugin_host()


@pytest.fixture
def keep_logger_config():
    """The CLI configures the `asyncbatch` logger (level, stderr handler); undo that after the test."""
    log = logging.getLogger("asyncbatch")
    level, handlers = log.level, list(log.handlers)
    yield
    log.setLevel(level)
    log.handlers[:] = handlers


@pytest.fixture
def example_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_default_host: None) -> Path:
    """The example plugin "installed" into tmp_path/site, visible on sys.path for this test only."""
    site = tmp_path / "site"
    _install_example(site)
    _forget_example()
    monkeypatch.syspath_prepend(str(site))
    reset_plugin_host()
    yield site
    reset_plugin_host()
    _forget_example()


# ---------------------------------------------------------------- the example package, discovered for real


def test_example_plugin_discovered_through_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       fresh_default_host: None) -> None:
    already = "example" in _installed_names()
    if not already:  # nothing installed globally: without the site directory there is no such plugin
        assert "longest_wait" not in PluginHost.create().registry("scheduler")

    project = _example_project()
    assert project["name"] == "asyncbatch-example-plugin"
    assert "asyncbatch" in project["dependencies"]
    assert project["entry-points"]["asyncbatch"] == {"example": PKG}
    site = tmp_path / "site"
    _install_example(site)
    _forget_example()
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "example" in _installed_names()
        host = PluginHost.create()
        assert "example" in host.plugin_names()
        component = host.registry("scheduler").get("longest_wait")
        assert component.plugin == "example"
        module = sys.modules[PKG]
        if not already:
            assert Path(module.__file__).resolve().is_relative_to(site.resolve())  # loaded from the entry point
        assert component.factory is module.LongestWait
        assert component.config_cls is module.LongestWaitConfig
        assert issubclass(component.factory, asyncbatch.Scheduler)
        assert attrs.has(component.config_cls) and attrs.fields(component.config_cls)
        assert "waited longest" in component.description

        # The process-wide host rescans entry points after a reset.
        reset_plugin_host()
        assert get_plugin_host().registry("scheduler").get("longest_wait").plugin == "example"
        # Its lifecycle hooks are registered once, under the entry point's name.
        for hook in ("asyncbatch_step_finished", "asyncbatch_request_finished", "asyncbatch_run_finished"):
            impls = getattr(get_plugin_host().pm.hook, hook).get_hookimpls()
            assert [i.plugin_name for i in impls].count("example") == 1, hook
    finally:
        reset_plugin_host()
        _forget_example()


def test_example_plugin_imports_no_torch() -> None:
    code = (f"import sys; sys.path.insert(0, {str(EXAMPLE / 'src')!r}); import {PKG}; "
            f"from asyncbatch.core.plugin_host import PluginHost; "
            f"PluginHost.create(extra_plugins=[{PKG}], load_entry_points=False); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')); "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leave no __pycache__ in examples/
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


def test_example_plugin_config_validated(example_site: Path) -> None:
    module = importlib.import_module(PKG)
    spec = EngineConfig.from_dict({"scheduler": {"name": "longest_wait", "aging_tokens": 2}}).scheduler
    assert spec.config == module.LongestWaitConfig(aging_tokens=2.0)
    with pytest.raises(asyncbatch.ConfigError, match=r"engine\.scheduler.*aging_tokens must be > 0"):
        EngineConfig.from_dict({"scheduler": {"name": "longest_wait", "aging_tokens": 0}}, key="engine")
    with pytest.raises(asyncbatch.ConfigError, match=r"scheduler\.bogus.*unknown key.*aging_tokens"):
        EngineConfig.from_dict({"scheduler": {"name": "longest_wait", "bogus": 1}})


def test_cli_list_shows_example_plugin(example_site: Path, capsys: pytest.CaptureFixture[str],
                                       keep_logger_config: None) -> None:
    cli = pytest.importorskip("asyncbatch.cli", reason="asyncbatch.cli is not written yet")
    assert cli.main(["--log-level", "warning", "list"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    (row,) = [r for r in rows if r[:2] == ["scheduler", "longest_wait"]]
    assert row[2] == "example", out
    assert any(c.startswith("aging_tokens=16") for c in row) and "waited" in row, out
    assert any(r[:3] == ["scheduler", "fifo", "asyncbatch.plugins.builtin"] for r in rows)


EXPERIMENT_YAML = """\
name: plugin-demo
engine:
  model: {preset: tiny, dtype: float32}
  scheduler: {name: longest_wait, aging_tokens: 4}
  cache: {block_size: 16, num_blocks: 64}
  batch: {max_tokens: 64, max_seqs: 4}
workload:
  name: synthetic
  num_requests: 8
  seed: 3
  prompt_len: {dist: uniform, min: 4, max: 40}
  output_len: {dist: uniform, min: 2, max: 8}
sampling: {max_new_tokens: 8}
output: {plots: false, progress: false}
"""


def _run_experiment_file(path: Path, out_dir: Path) -> dict[str, Any]:
    """Run an experiment file the way a user does (`asyncbatch run`); returns its results.json content.

    Until the CLI exists, the same steps by hand: engine and workload looked up by name in the default host."""
    try:
        from asyncbatch import cli
    except ImportError:
        cli = None
    if cli is not None:
        rc = cli.main(["--log-level", "warning", "run", str(path), "--out", str(out_dir), "--no-progress"])
        assert rc == 0
        return json.loads((out_dir / "results.json").read_text())
    exp = ExperimentConfig.from_yaml(path)
    host = get_plugin_host()
    engine = Engine.from_config(exp.engine, host=host)
    workload = host.registry("workload").get(exp.workload.name, "workload")
    requests = workload.factory(exp.workload.config, vocab_size=engine.geometry["vocab"], seed=exp.seed)
    result = engine.run(requests.requests(exp.sampling, tokenizer=engine.tokenizer))
    return {"summary": attrs.asdict(result.summary),
            "outputs": [{"finish_reason": o.finish_reason, "error": o.error, "output_tokens": len(o.token_ids)}
                        for o in result.outputs],
            "steps": [{**attrs.asdict(s), "host_s": s.host_s} for s in result.steps]}


def test_yaml_experiment_runs_example_scheduler_and_metrics(example_site: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            keep_logger_config: None) -> None:
    metrics_file = tmp_path / "metrics" / "metrics.json"
    monkeypatch.setenv("ASYNCBATCH_EXAMPLE_METRICS", str(metrics_file))
    path = tmp_path / "experiment.yaml"
    path.write_text(EXPERIMENT_YAML)
    exp = ExperimentConfig.from_yaml(path)  # no host given: the process-wide one, found through entry points
    module = sys.modules[PKG]
    module.METRICS.reset()
    assert exp.engine.scheduler.name == "longest_wait"
    assert exp.engine.scheduler.config == module.LongestWaitConfig(aging_tokens=4.0)
    assert (exp.engine.buffers.name, exp.engine.streams.name) == ("double", "three")  # the asynchronous default
    built: list[Any] = []
    original_init = module.LongestWait.__init__

    def recording_init(self: Any, config: Any = None) -> None:
        built.append(config)
        original_init(self, config)

    monkeypatch.setattr(module.LongestWait, "__init__", recording_init)

    results = _run_experiment_file(path, tmp_path / "out")
    assert built == [module.LongestWaitConfig(aging_tokens=4.0)]  # the engine ran the plugin's scheduler
    outputs, summary, steps = results["outputs"], results["summary"], results["steps"]
    assert len(outputs) == 8 and summary["num_requests"] == 8
    assert [o["finish_reason"] for o in outputs] == ["length"] * 8
    assert all(o["error"] is None and 2 <= o["output_tokens"] <= 8 for o in outputs)
    assert summary["hook_errors"] == 0
    assert max(s["num_seqs"] for s in steps) == 4  # the row limit was reached: admission order mattered

    # The metrics hook saw every step, in one run, and agrees with the engine's own step records.
    assert len(module.METRICS.runs) == 1
    report = module.METRICS.last_run
    assert report["steps_seen"] == summary["steps"] == len(steps) > 0
    sizes = Counter(s["num_seqs"] for s in steps)
    assert report["batch_size_histogram"] == {str(k): v for k, v in sorted(sizes.items())}
    assert sum(report["batch_tokens_histogram"].values()) == len(steps)
    assert report["max_host_ms"] == pytest.approx(max(s["host_s"] for s in steps) * 1e3)
    assert report["finish_reasons"] == {"length": 8}
    assert report["summary"]["steps"] == summary["steps"]
    # ... and wrote it where the environment variable pointed.
    written = json.loads(metrics_file.read_text())
    assert written == json.loads(json.dumps(module.METRICS.snapshot()))
    assert written["total_steps"] == len(steps)


def test_longest_wait_tokens_match_fifo(example_site: Path, tiny_model: Any,
                                        fifo_tokens: list[tuple[int, ...]]) -> None:
    """A plugin scheduler changes the order of work, never the tokens (greedy, no stop tokens)."""
    host = PluginHost.create()
    for params in ({"aging_tokens": 0.5}, {"aging_tokens": 64.0, "chunked_prefill": False}):
        engine = _engine(tiny_model, host, scheduler={"name": "longest_wait", **params})
        outputs = engine.generate(_prompts(), GREEDY)
        assert [o.token_ids for o in outputs] == fifo_tokens, params
    assert sys.modules[PKG].METRICS.last_run["finish_reasons"] == {"length": 8}


def test_longest_wait_policy_short_first_and_no_starvation(example_site: Path) -> None:
    """Scheduler alone, on the pure-Python `SchedulingState`: one free row per batch, nothing running."""
    from asyncbatch.core.pools import DeferredPool
    from asyncbatch.core.requests import RequestState

    module = importlib.import_module(PKG)

    def waiting(name: str, prompt_len: int) -> RequestState:
        return RequestState(asyncbatch.Request(name, tuple(range(prompt_len))), 0, max_len=1024, seed=0)

    def admit(scheduler: Any, batch: int, queue: list[RequestState]) -> list[str]:
        state = asyncbatch.SchedulingState(batch, [], queue, max_tokens=64, max_seqs=1, block_size=16,
                                           blocks=DeferredPool(63, first=1, name="block"),
                                           rows=DeferredPool(4, name="row"))
        scheduler.schedule(state)
        return [e.req.request_id for e in state.entries]

    # Equal waits: the shortest prompt first, whatever the arrival order.
    scheduler = module.LongestWait(module.LongestWaitConfig(aging_tokens=4.0))
    queue = [waiting("long", 40), waiting("short", 4), waiting("mid", 20)]
    assert admit(scheduler, 0, queue) == ["short"]
    assert admit(scheduler, 1, [queue[0], queue[2]]) == ["mid"]
    # A long prompt overtakes fresh short ones once it has waited (40 - 4) / 4 = 9 steps more than they have.
    scheduler = module.LongestWait(module.LongestWaitConfig(aging_tokens=4.0))
    long = waiting("long", 40)
    picked = [admit(scheduler, k, [long, waiting(f"s{k}", 4)])[0] for k in range(12)]
    assert picked.index("long") == 9 and picked[:9] == [f"s{k}" for k in range(9)]
    # Large aging approaches arrival order: one step of waiting outweighs the prompt-length difference.
    for aging, first in [(100.0, "long"), (4.0, "short")]:
        scheduler = module.LongestWait(module.LongestWaitConfig(aging_tokens=aging))
        long, blocker = waiting("long", 40), waiting("blocker", 2)
        assert admit(scheduler, 0, [blocker, long]) == ["blocker"]
        assert admit(scheduler, 1, [long, waiting("short", 4)]) == [first], aging


def test_example_plugin_builds_with_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        fresh_default_host: None) -> None:
    """The real pyproject.toml builds offline and its metadata declares the entry point (slower: runs pip)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "project"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not available")
    assert proc.returncode == 0, proc.stderr
    (dist,) = site.glob("asyncbatch_example_plugin-*.dist-info")
    eps = [ep for ep in importlib.metadata.PathDistribution(dist).entry_points if ep.group == ENTRY_POINT_GROUP]
    assert [(ep.name, ep.value) for ep in eps] == [("example", PKG)]
    _forget_example()
    monkeypatch.syspath_prepend(str(site))
    try:
        assert PluginHost.create().registry("scheduler").get("longest_wait").plugin == "example"
    finally:
        reset_plugin_host()
        _forget_example()


# ---------------------------------------------------------------- schedulers defined by a test


@attrs.frozen
class NewestFirstConfig:
    """`max_admit`: at most this many new requests per batch."""

    max_admit: int = 2


class NewestFirst(asyncbatch.Scheduler):
    """Decode first, then prefills in progress, then new requests newest first (LIFO admission)."""

    Config = NewestFirstConfig

    def __init__(self, config: NewestFirstConfig | None = None) -> None:
        self.config = config or NewestFirstConfig()
        self.admitted: list[str] = []

    def schedule(self, state: asyncbatch.SchedulingState) -> None:
        for req in state.running:
            if req.is_decode:
                state.add(req, 1)
        for req in state.running:
            if req.is_prefill and state.token_budget > 0:
                state.add(req, state.max_chunk(req))
        admitted = 0
        for req in reversed(state.waiting):
            if admitted == self.config.max_admit or state.token_budget == 0:
                break
            if state.add(req, state.max_chunk(req)):
                self.admitted.append(req.request_id)
                admitted += 1


class NewestFirstPlugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        register("newest_first", NewestFirst)


def test_custom_scheduler_runs_unchanged_under_default_engine(tiny_model: Any,
                                                              fifo_tokens: list[tuple[int, ...]]) -> None:
    host = PluginHost.create(extra_plugins=[NewestFirstPlugin()], load_entry_points=False)
    component = host.registry("scheduler").get("newest_first")
    assert component.plugin == "NewestFirstPlugin" and component.config_cls is NewestFirstConfig
    engine = _engine(tiny_model, host, scheduler={"name": "newest_first", "max_admit": 1})
    assert (engine.config.buffers.name, engine.config.streams.name) == ("double", "three")
    result = engine.run(engine.make_requests(_prompts(), GREEDY))
    assert [o.token_ids for o in result.outputs] == fifo_tokens
    assert engine.scheduler.admitted[0] == str(len(fifo_tokens) - 1)  # it really admitted newest first
    assert sorted(engine.scheduler.admitted, key=int) == [str(i) for i in range(len(fifo_tokens))]
    assert all(s.num_seqs - s.num_decode <= 2 for s in result.steps)  # max_admit: 1 new + 1 split prompt


# ---------------------------------------------------------------- failures are named, never silent


class BrokenRegistration:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        raise RuntimeError("cannot register today")


def test_registration_hook_that_raises_names_the_plugin() -> None:
    with pytest.raises(PluginError, match=r"BrokenRegistration.*asyncbatch_register_schedulers.*cannot register") as e:
        PluginHost.create(extra_plugins=[BrokenRegistration()], load_entry_points=False)
    assert e.value.plugin == "BrokenRegistration"
    assert isinstance(e.value.__cause__, RuntimeError)

    # A module plugin is named by its module name; a bad registration (config not attrs) is a failure too.
    module = types.ModuleType("my_bad_plugin")

    class NotAttrsConfig:
        pass

    class BadConfigScheduler(NewestFirst):
        Config = NotAttrsConfig

    module.asyncbatch_register_schedulers = asyncbatch.hookimpl(lambda register: register("bad", BadConfigScheduler))
    with pytest.raises(PluginError, match=r"'my_bad_plugin'.*must be an attrs class"):
        PluginHost.create(extra_plugins=[module], load_entry_points=False)


class FlakyObserver:
    @asyncbatch.hookimpl
    def asyncbatch_step_finished(self, stats: Any) -> None:
        raise RuntimeError("step hook broke")

    @asyncbatch.hookimpl
    def asyncbatch_request_finished(self, output: Any) -> None:
        raise ValueError("request hook broke")

    @asyncbatch.hookimpl
    def asyncbatch_run_finished(self, summary: Any) -> None:
        raise KeyError("run hook broke")


class Recorder:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.finished: list[str] = []
        self.summaries: list[Any] = []

    @asyncbatch.hookimpl
    def asyncbatch_step_finished(self, stats: Any) -> None:
        self.steps.append(stats.batch)

    @asyncbatch.hookimpl
    def asyncbatch_request_finished(self, output: Any) -> None:
        self.finished.append(output.request_id)

    @asyncbatch.hookimpl
    def asyncbatch_run_finished(self, summary: Any) -> None:
        self.summaries.append(summary)


def test_lifecycle_hooks_that_raise_lose_no_output(tiny_model: Any, fifo_tokens: list[tuple[int, ...]],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    host = PluginHost.create(extra_plugins=[FlakyObserver(), recorder], load_entry_points=False)
    engine = _engine(tiny_model, host)
    n = len(fifo_tokens)
    with caplog.at_level(logging.ERROR, logger="asyncbatch"):
        result = engine.run(engine.make_requests(_prompts(), GREEDY))

    outputs, summary = result.outputs, result.summary
    assert [o.token_ids for o in outputs] == fifo_tokens
    assert [o.finish_reason for o in outputs] == ["length"] * n
    # One per step, one per request and one for run_finished: the run's summary counts every failure of its hooks.
    assert summary.hook_errors == len(result.steps) + n + 1 > 1
    assert len(host.hook_errors) == summary.hook_errors
    assert {(e.plugin, e.hook) for e in host.hook_errors} == {
        ("FlakyObserver", "asyncbatch_step_finished"),
        ("FlakyObserver", "asyncbatch_request_finished"),
        ("FlakyObserver", "asyncbatch_run_finished"),
    }
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncbatch" and r.levelno >= logging.ERROR]
    for hook, text in [("asyncbatch_step_finished", "step hook broke"),
                       ("asyncbatch_request_finished", "request hook broke"),
                       ("asyncbatch_run_finished", "run hook broke")]:
        assert any("FlakyObserver" in m and hook in m and text in m for m in messages), messages
    # Other plugins' hooks still ran for every step and request.
    assert recorder.steps == [s.batch for s in result.steps]
    assert sorted(recorder.finished, key=int) == [str(i) for i in range(n)]
    # run_finished hooks get the summary before their own failures are known: every other failure is in it.
    assert recorder.summaries == [attrs.evolve(summary, hook_errors=summary.hook_errors - 1)]


def _named_plugin(class_name: str, component: str) -> object:
    def asyncbatch_register_schedulers(self: Any, register: Any) -> None:
        register(component, NewestFirst)

    return type(class_name, (), {"asyncbatch_register_schedulers": asyncbatch.hookimpl(asyncbatch_register_schedulers)})()


def test_duplicate_component_names_are_refused_naming_both_plugins() -> None:
    first, second = _named_plugin("FirstPlugin", "same_name"), _named_plugin("SecondPlugin", "same_name")
    with pytest.raises(PluginError, match=r"scheduler 'same_name' registered twice") as e:
        PluginHost.create(extra_plugins=[first, second], load_entry_points=False)
    assert "FirstPlugin" in str(e.value) and "SecondPlugin" in str(e.value)
    assert e.value.plugin in ("FirstPlugin", "SecondPlugin")

    # Shadowing a built-in is refused the same way.
    with pytest.raises(PluginError, match=r"'fifo' registered twice") as e:
        PluginHost.create(extra_plugins=[_named_plugin("ShadowPlugin", "fifo")], load_entry_points=False)
    assert "asyncbatch.plugins.builtin" in str(e.value) and "ShadowPlugin" in str(e.value)


def test_duplicate_blames_the_later_plugin_not_the_builtin() -> None:
    """The plugin that registers a taken name second is the one named as failing."""
    with pytest.raises(PluginError) as e:
        PluginHost.create(extra_plugins=[_named_plugin("ShadowPlugin", "fifo")], load_entry_points=False)
    assert e.value.plugin == "ShadowPlugin"
    first, second = _named_plugin("FirstPlugin", "same_name"), _named_plugin("SecondPlugin", "same_name")
    with pytest.raises(PluginError) as e:
        PluginHost.create(extra_plugins=[first, second], load_entry_points=False)
    assert e.value.plugin == "SecondPlugin"


def test_broken_entry_point_names_the_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  fresh_default_host: None) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "asyncbatch_broken_plugin.py").write_text('raise ImportError("needs the missing package frobnicate")\n')
    _write_dist(site, "asyncbatch-broken-plugin", "0.0.1", {"broken_ep": "asyncbatch_broken_plugin"})
    monkeypatch.syspath_prepend(str(site))
    try:
        with pytest.raises(PluginError, match=r"'broken_ep'.*entry point asyncbatch_broken_plugin.*frobnicate") as e:
            PluginHost.create()
        assert e.value.plugin == "broken_ep"
        with pytest.raises(PluginError, match="broken_ep"):  # so does the process-wide host, and YAML loading
            EngineConfig.from_dict({"scheduler": "fifo"})
        # A host that does not scan entry points is unaffected.
        assert "fifo" in PluginHost.create(load_entry_points=False).registry("scheduler")
    finally:
        reset_plugin_host()
        sys.modules.pop("asyncbatch_broken_plugin", None)
