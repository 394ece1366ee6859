"""The simulation study (`asyncbatch simulate`): slot counts and named components on the axes, plugins, the YAML
file and its flag overrides, fill and drain, and the analytic model against the discrete-event simulation.

CPU only. Studies are shrunk (few requests, short horizons, one or two axes) except where the horizon is what is
tested. The study builds its own tiny model per call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

import asyncbatch
from asyncbatch import PluginHost
from asyncbatch.cli import main
from asyncbatch.core.errors import ConfigError
from asyncbatch.plugins.simulate import StudyRow, run_study
from asyncbatch.plugins.simulate_config import StudyConfig, StudyCosts, load_study
from asyncbatch.strategies.schedulers import Fifo

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "warning", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["buffers"], r["streams"], r["graphs"]): r for r in json.loads(path.read_text())["rows"]}


@pytest.fixture
def no_model_builds(monkeypatch):
    import asyncbatch.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for an invalid study")

    monkeypatch.setattr(models, "build_model", refuse)


# ---------------------------------------------------------------- the default grid and its table


def test_default_axes_reproduce_the_published_shape(tmp_path, capsys):
    path = tmp_path / "sim.json"
    code, out, _ = _run(capsys, "simulate", "--steps", "12", "--requests", "2", "--out", str(path))
    assert code == 0
    rows = _rows(path)
    expected_keys = {(b, s, g) for b in ("single", "double", "n_slot(3)") for s in ("one", "two", "three")
                     for g in ("eager", "per_slot")}
    assert set(rows) == expected_keys
    # One slot: host work, launch, compute and d2h take turns (the h2d hides under the launch).
    assert rows["single", "one", "eager"]["busy_run"] == pytest.approx(28 / (28 + 8.3 + 0.5 + 0.02), abs=1e-6)
    assert rows["double", "three", "per_slot"]["busy_steady"] == pytest.approx(1.0, abs=1e-6)
    assert rows["double", "three", "per_slot"]["tokens_per_s"] > 1.2 * rows["single", "one", "eager"]["tokens_per_s"]
    for r in rows.values():
        assert r["steps"] == 12 and r["busy_steady"] == pytest.approx(r["expected_busy"], abs=1e-3)
    line = next(x for x in out.splitlines() if x.split()[:3] == ["single", "one", "eager"])
    assert line.split()[3:7] == ["0.760", "0.760", "0.760", "0.760"]
    assert "fill and drain" in out and "steady busy" in out
    data = json.loads(path.read_text())
    assert {"study", "costs", "steps", "requests", "cost_model", "analytic", "rows"} <= set(data)
    assert data["steps"] == 12 and data["requests"] == 2
    assert set(data["rows"][0]) == {f.name for f in attrs.fields(StudyRow)}


def test_host_bound_costs_say_overlap_cannot_help(capsys):
    code, out, _ = _run(capsys, "simulate", "--cpu-ms", "40", "--steps", "16", "--requests", "1",
                        "--streams", "three", "--graphs", "eager")
    assert code == 0
    assert "host-bound" in out
    busy = {x.split()[0]: float(x.split()[5]) for x in out.splitlines()
            if x.split()[:1] in (["single"], ["double"], ["n_slot(3)"])}
    assert busy == pytest.approx({"single": 28 / 68.52, "double": 28 / 40.5, "n_slot(3)": 28 / 40.5}, abs=1e-3)


def test_help_states_the_real_defaults(capsys):
    assert main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    c, study = StudyCosts(), load_study()
    for flag, value in (("--gpu-ms", c.gpu_ms), ("--cpu-ms", c.cpu_ms), ("--launch-eager-ms", c.launch_eager_ms),
                        ("--launch-graph-ms", c.launch_graph_ms), ("--h2d-ms", c.h2d_ms), ("--d2h-ms", c.d2h_ms),
                        ("--steps", study.steps), ("--requests", study.workload.requests),
                        ("--prompt-len", study.workload.prompt_len)):
        after = text.split(flag, 2)[-1]  # the flag's own help, not the usage line
        assert f"(default {value:g})" in after.split(" --")[0], flag


# ---------------------------------------------------------------- fill, drain and the horizon


def test_fill_and_drain_cost_one_latency_less_one_period():
    """n_slot(3) on three streams at the old 32-step horizon: the runtime's busy fraction (first compute to last)
    reads 1.000, the whole run 0.990: the first prep + launch (6.725 ms) and the last d2h + update (2.095 ms)
    are the GPU's only idle time, once per run, whatever the slot count."""
    study = load_study(flags={"--steps": 32, "--requests": 1, "--slots": "1,3,8", "--streams": "three",
                              "--graphs": "eager"})
    rows = {r.buffers: r for r in run_study(study)}
    n3 = rows["n_slot(3)"]
    assert n3.busy == pytest.approx(1.0, abs=1e-9)
    assert n3.busy_steady == pytest.approx(1.0, abs=1e-9)
    assert n3.busy_run == pytest.approx(32 * 28 / (32 * 28 + 6.725 + 2.095), abs=1e-6)
    assert n3.busy_run == pytest.approx(rows["n_slot(8)"].busy_run, abs=1e-9)
    # One slot pays the same host time every step, so the whole run and the steady state agree exactly.
    assert rows["single"].busy_run == pytest.approx(rows["single"].busy_steady, abs=1e-9)


def test_default_horizon_reports_the_long_run_busy_within_half_a_percent():
    study = load_study(flags={"--requests": 1, "--slots": "2", "--graphs": "eager"})
    for r in run_study(study):
        assert r.steps == study.steps
        assert r.busy_steady - r.busy_run < 0.005, r


# ---------------------------------------------------------------- the analytic model against the simulation

SHAPES = {
    "gpu-bound": {},
    "host-bound": {"--cpu-ms": 40.0},
    "launch-bound when eager": {"--gpu-ms": 10.0, "--cpu-ms": 8.0, "--launch-eager-ms": 4.0},
    "copies on shared streams": {"--h2d-ms": 2.0, "--d2h-ms": 1.5},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_analytic_expectation_matches_the_simulation(shape):
    study = load_study(flags={**SHAPES[shape], "--steps": 40, "--requests": 1, "--slots": "1,2,4"})
    rows = run_study(study)
    assert len(rows) == 3 * 3 * 2
    for r in rows:
        assert r.busy_steady == pytest.approx(r.expected_busy, abs=1e-3), r
        assert r.busy_run == pytest.approx(r.expected_run, abs=1e-3), r
    if shape == "copies on shared streams":  # an h2d queued behind the last d2h sits between two computes
        busy = {(r.buffers, r.streams): r.busy_steady for r in rows if r.graphs == "eager"}
        assert busy["double", "two"] == pytest.approx(28 / (28 + 2 + 1.5), abs=1e-3)
        assert busy["double", "three"] == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------- axes: slot counts and names


def test_slot_counts_give_one_row_each_then_named_policies():
    study = load_study(flags={"--slots": "1,2,3,4,8", "--buffers": "n_slot:num_slots=5", "--streams": "three",
                              "--graphs": "eager", "--steps": 6, "--requests": 1})
    rows = run_study(study)
    assert [(r.buffers, r.slots) for r in rows] == [
        ("single", 1), ("double", 2), ("n_slot(3)", 3), ("n_slot(4)", 4), ("n_slot(8)", 8), ("n_slot(5)", 5)]


def test_buffers_alone_replace_the_default_slots():
    study = load_study(flags={"--buffers": "[double, {name: n_slot, num_slots: 6}]"})
    assert [c.label for c in study.buffers] == ["double", "n_slot(6)"]
    assert [c.label for c in study.streams] == ["one", "two", "three"]


@pytest.mark.parametrize("flags, key, needle", [
    ({"--buffers": "nope"}, "--buffers[0]", "unknown buffer_policy 'nope' (valid: double, n_slot, single)"),
    ({"--streams": "one,four"}, "--streams[1]", "(valid: one, three, two)"),
    ({"--graphs": "eager,warp"}, "--graphs[1]", "(valid: eager, mixed, per_slot, staged)"),
    ({"--scheduler": "lifo"}, "--scheduler", "unknown scheduler 'lifo' (valid: fair_prefix, fifo,"),
    ({"--slots": "0"}, "--slots[0]", "a slot count is >= 1"),
    ({"--slots": "1,x"}, "--slots", "comma list of ints"),
    ({"--buffers": "n_slot:num_slots=1"}, "--buffers[0].num_slots", "at least 2 slots"),
    ({"--slots": "2", "--buffers": "double"}, "--buffers", "'double' is listed twice"),
    ({"--steps": 1}, "--steps", "must be >= 2"),
    ({"--steps": 2047}, "--steps", "2048-token context"),
    ({"--gpu-ms": float("nan")}, "--gpu-ms", "finite number > 0"),
    ({"--h2d-ms": -1.0}, "--h2d-ms", "finite number >= 0"),
    ({"--requests": 0}, "--requests", "must be >= 1"),
])
def test_bad_flags_name_the_flag_and_the_choices(flags, key, needle):
    with pytest.raises(ConfigError) as exc:
        load_study(flags=flags)
    assert (key, True) == (exc.value.key, needle in str(exc.value))


def test_cli_errors_exit_2_before_building_a_model(capsys, no_model_builds):
    code, _, err = _run(capsys, "simulate", "--buffers", "double,quad")
    assert (code, err.strip()) == (2, "asyncbatch: config error: --buffers[1]: unknown buffer_policy 'quad' "
                                      "(valid: double, n_slot, single)")


# ---------------------------------------------------------------- the YAML file


def _write(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(data)
    return path


def test_shipped_file_is_the_defaults():
    assert load_study(ROOT / "configs" / "simulate.yaml") == load_study()


def test_file_values_and_flag_overrides(tmp_path):
    path = _write(tmp_path, "simulate:\n  costs: {gpu_ms: 10, cpu_ms: 30}\n  steps: 20\n  slots: [1, 4]\n"
                            "  buffers: [{name: n_slot, num_slots: 6}]\n  streams: two\n  graphs: [eager]\n"
                            "  workload: {requests: 3}\n  scheduler: {name: fifo, chunked_prefill: false}\n")
    study = load_study(path)
    assert (study.costs.gpu_ms, study.costs.cpu_ms, study.costs.h2d_ms) == (10.0, 30.0, 0.05)
    assert (study.steps, study.workload.requests, study.workload.prompt_len) == (20, 3, 4)
    assert [c.label for c in study.buffers] == ["single", "n_slot(4)", "n_slot(6)"]
    assert ([c.label for c in study.streams], [c.label for c in study.graphs]) == (["two"], ["eager"])
    assert study.scheduler.config.chunked_prefill is False
    over = load_study(path, {"--gpu-ms": 12.0, "--slots": "2", "--streams": "one,three", "--steps": 8})
    assert (over.costs.gpu_ms, over.costs.cpu_ms, over.steps) == (12.0, 30.0, 8)
    assert [c.label for c in over.buffers] == ["double", "n_slot(6)"]  # --slots replaces slots, not buffers
    assert [c.label for c in over.streams] == ["one", "three"]
    assert StudyConfig.from_dict(over.to_dict()) == over


def test_cli_reads_the_file_and_flags_win(tmp_path, capsys):
    path = _write(tmp_path, "simulate:\n  steps: 5\n  workload: {requests: 1}\n  slots: [1]\n  streams: [one]\n"
                            "  graphs: [eager]\n  costs: {gpu_ms: 20}\n")
    out_json = tmp_path / "o.json"
    code, out, _ = _run(capsys, "simulate", str(path), "--cpu-ms", "5", "--out", str(out_json))
    assert code == 0
    data = json.loads(out_json.read_text())
    assert (data["costs"]["gpu_ms"], data["costs"]["cpu_ms"], data["steps"]) == (20.0, 5.0, 5)
    assert [(r["buffers"], r["streams"], r["graphs"]) for r in data["rows"]] == [("single", "one", "eager")]
    assert "1 request x 5 tokens" in out


@pytest.mark.parametrize("text, key, valid", [
    ("simulat: {}\n", "simulat", ["simulate"]),
    ("name: x\nsimulate: {}\n", "name", ["simulate"]),
    ("simulate: {stepz: 3}\n", "simulate.stepz",
     ["buffers", "costs", "graphs", "scheduler", "slots", "steps", "streams", "workload"]),
    ("simulate: {costs: {gpu: 1}}\n", "simulate.costs.gpu",
     ["cpu_ms", "d2h_ms", "gpu_ms", "h2d_ms", "launch_eager_ms", "launch_graph_ms"]),
    ("simulate: {workload: {prompt: 2}}\n", "simulate.workload.prompt", ["prompt_len", "requests"]),
    ("simulate: {buffers: [double, ring]}\n", "simulate.buffers[1]", ["double", "n_slot", "single"]),
])
def test_file_errors_name_the_key_and_the_valid_ones(tmp_path, text, key, valid):
    with pytest.raises(ConfigError) as exc:
        load_study(_write(tmp_path, text))
    assert (key, valid) == (exc.value.key, exc.value.valid)


def test_file_without_the_mapping_or_with_empty_axes(tmp_path):
    with pytest.raises(ConfigError, match=r"^simulate: missing in"):
        load_study(_write(tmp_path, "{}\n"))
    with pytest.raises(ConfigError, match=r"^simulate\.buffers: the buffers axis is empty: give slots or buffers"):
        load_study(_write(tmp_path, "simulate: {slots: []}\n"))
    with pytest.raises(ConfigError, match=r"^simulate\.costs\.gpu_ms: must be a finite number > 0, got 0"):
        load_study(_write(tmp_path, "simulate: {costs: {gpu_ms: 0}}\n"))


# ---------------------------------------------------------------- plugins


@attrs.frozen
class RingConfig:
    slots: int = 4


class Ring(asyncbatch.BufferPolicy):
    """A plugin's buffer policy: `slots` slots."""

    Config = RingConfig

    def __init__(self, config: RingConfig | None = None) -> None:
        self.config = config or RingConfig()

    @property
    def num_slots(self) -> int:
        return self.config.slots


class CountingFifo(Fifo):
    """A plugin's scheduler: fifo that counts its calls."""

    calls = 0

    def schedule(self, state: Any) -> None:
        type(self).calls += 1
        super().schedule(state)


class RingPlugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_buffer_policies(self, register: Any) -> None:
        register("ring", Ring)

    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        register("counting_fifo", CountingFifo)


def test_plugin_buffer_policy_and_scheduler_take_part():
    host = PluginHost.create(extra_plugins=[RingPlugin()], load_entry_points=False)
    with pytest.raises(ConfigError, match="unknown buffer_policy 'ring'"):
        load_study(flags={"--buffers": "ring"})  # the default host knows no such policy
    study = load_study(flags={"--slots": "1", "--buffers": "ring,ring:slots=6", "--scheduler": "counting_fifo",
                              "--streams": "three", "--graphs": "eager", "--steps": 24, "--requests": 1}, host=host)
    CountingFifo.calls = 0
    rows = run_study(study, host=host)
    assert [(r.buffers, r.slots) for r in rows] == [("single", 1), ("ring", 4), ("ring(6)", 6)]
    assert CountingFifo.calls >= 3 * 24  # every step of every combination was planned by the plugin
    for r in rows:
        assert r.busy_steady == pytest.approx(r.expected_busy, abs=1e-3)


def test_cli_builds_through_the_process_plugin_host(monkeypatch, tmp_path, capsys):
    import asyncbatch.core.plugin_host as plugin_host

    monkeypatch.setattr(plugin_host, "_default_host",
                        PluginHost.create(extra_plugins=[RingPlugin()], load_entry_points=False))
    out_json = tmp_path / "o.json"
    code, _, err = _run(capsys, "simulate", "--slots", "2", "--buffers", "ring:slots=3", "--streams", "three",
                        "--graphs", "eager", "--steps", "4", "--requests", "1", "--out", str(out_json))
    assert (code, err) == (0, "")
    assert [(r["buffers"], r["slots"]) for r in json.loads(out_json.read_text())["rows"]] == [
        ("double", 2), ("ring(3)", 3)]
