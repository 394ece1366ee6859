"""Races as a result (core/races.py) and the `sim` runtime's measured host time.

A race is reported as the ordering that was missing, named by the pipeline's event table where it can
be: every edge of `pipeline.EDGES`, removed alone, is reported as itself. A buffer policy that breaks the slot
cycle is reported as the four slot-reuse edges, in `random` and in `timed` order; where the race corrupts data
badly enough to break a step, the run fails with a `RaceError` chained from what broke, not a bare IndexError.
"""

from __future__ import annotations

import random
import time

import attrs
import pytest
from strategies import engine_dict
from test_edges import CASES, MIXED, _conflicts

import asyncbatch
from asyncbatch import Engine, EngineConfig, PluginHost, SamplingParams
from asyncbatch.core.errors import AsyncBatchError, ConfigError
from asyncbatch.core.interfaces import BufferPolicy
from asyncbatch.core.pipeline import EDGES
from asyncbatch.core.races import RaceError, RaceReport, describe_resource, race_report, raise_if_racy
from asyncbatch.core.runtime.hb import Conflict, NodeInfo
from asyncbatch.strategies.schedulers import Fifo

SLOT_EDGES = frozenset({"h2d->prep", "comp->h2d", "d2h->comp", "upd->d2h"})


@attrs.frozen
class StuckConfig:
    """`num_slots` slots, every batch in slot 0: batch k reuses the slot of batch k-1, which the edges (keyed
    on batch k - num_slots) do not order."""

    num_slots: int = 2


class Stuck(BufferPolicy):
    Config = StuckConfig

    def __init__(self, config: StuckConfig | None = None) -> None:
        self.config = config or StuckConfig()

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    def slot_for(self, batch_index: int) -> int:
        return 0


class SlowFifo(Fifo):
    """fifo that takes 30 ms of real time per schedule call."""

    def schedule(self, state):
        time.sleep(0.030)
        super().schedule(state)


class Plugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_buffer_policies(self, register):
        register("stuck", Stuck)

    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register):
        register("slow_fifo", SlowFifo)


@pytest.fixture(scope="module")
def host():
    return PluginHost.create(extra_plugins=[Plugin()], load_entry_points=False)


def _engine(model, host, *, buffers="double", runtime=None, scheduler="fifo", graphs="eager", **geometry):
    cfg = engine_dict(buffers, "three", graphs, scheduler, **geometry)
    cfg["runtime"] = {"name": "sim", "check": True, **(runtime or {})}
    return Engine.from_model(model, EngineConfig.from_dict(cfg, host=host), host=host)


def _work(seed, n=10):
    rng = random.Random(seed)
    return [([rng.randrange(512) for _ in range(rng.randint(1, 24))],
             SamplingParams(max_new_tokens=rng.randint(2, 8))) for _ in range(n)]


def _generate(engine, work):
    return engine.generate([p for p, _ in work], [s for _, s in work])


def _racy(engine, work):
    """Run a racy engine: the run completes, then fails as a RaceError carrying its result and report."""
    with pytest.raises(RaceError) as info:
        _generate(engine, work)
    result = info.value.result
    assert (result.races, None) == (info.value.report, info.value.__cause__)
    assert len(work) == len(result.outputs)
    return result


# ---------------------------------------------------------------- reports


def test_a_clean_engine_reports_no_race(tiny64, host):
    """The default composition (double / three / mixed / fifo), checked: an empty, falsey report."""
    engine = _engine(tiny64, host, graphs="mixed")
    _generate(engine, MIXED)

    report = race_report(engine.runtime)
    assert (True, 0, False) == (report is not None, report.count, bool(report))
    assert {"checked": True, "count": 0, "by_resource": {}, "by_missing_edge": {}, "pairs": [],
            "pairs_left_out": 0} == report.to_dict()
    assert report == raise_if_racy(engine.runtime)


def test_an_unchecked_runtime_has_no_report(tiny64, host):
    engine = _engine(tiny64, host, runtime={"check": False, "order": "timed"})
    _generate(engine, MIXED[:3])

    assert (None, False) == (race_report(engine.runtime), engine.runtime.tracks_accesses)
    assert None is raise_if_racy(engine.runtime)


@pytest.mark.parametrize("order", ["random", "timed"])
def test_a_policy_that_breaks_the_slot_cycle_misses_the_four_slot_edges(tiny64, host, order):
    """Two slots, every batch in slot 0: each batch reuses the slot of the one before, which no edge orders.
    In `timed` order the run completes (a real device copies `host_in` before the next prep overwrites it);
    before the sim ran ops up to the host's virtual time, it broke with an IndexError on larger workloads."""
    engine = _engine(tiny64, host, buffers="stuck", runtime={"order": order})
    _racy(engine, MIXED)

    report = race_report(engine.runtime)
    assert SLOT_EDGES == report.edges()
    assert SLOT_EDGES == set(report.by_edge())  # every pair has its edge
    assert {"host_in", "dev_in", "dev_out", "host_out"} == set(report.by_kind())
    assert len(engine.runtime.conflicts) == report.count == sum(report.by_edge().values())
    first = report.pairs[0]
    assert ("host_in[slot 0]", "h2d[0]", "prep[1]", "h2d->prep") == (first.resource, first.before.label(),
                                                                      first.after.label(), first.edge)
    assert "h2d[0] must happen before prep[1] (edge h2d->prep)" == first.ordering()
    with pytest.raises(RaceError) as info:
        raise_if_racy(engine.runtime, result="the run's result")
    assert (report, "the run's result", None) == (info.value.report, info.value.result, info.value.__cause__)
    assert str(info.value).startswith(f"{report.count} race(s) in the pipeline")
    assert "first: unordered read/write on host_in[slot 0]: h2d[0]@h2d vs prep[1]@host" in str(info.value)


def test_a_newer_op_issued_first_is_ordered_after_the_older_batch(tiny64, host):
    """The host issues d2h[k] before it runs upd[k-1]: the report puts the older batch first."""
    engine = _engine(tiny64, host, buffers="stuck")
    _racy(engine, MIXED)

    upd_pairs = [p for p in race_report(engine.runtime).pairs if "upd" in (p.before.name, p.after.name)]
    assert upd_pairs
    assert {("upd", "d2h", ("read", "write"), "upd->d2h")} == {(p.before.name, p.after.name, p.modes, p.edge)
                                                              for p in upd_pairs}
    assert all(p.before.batch == p.after.batch - 1 for p in upd_pairs)


def test_a_race_that_breaks_a_step_fails_as_a_race(tiny64, host):
    """Three slots all in slot 0, `timed` order: h2d[k+1] overwrites slot 0's inputs before comp[k] starts
    (the compute stream is still busy with comp[k-1]), so comp[k] runs on another batch's tables and indexes
    past a buffer, as it would on a device. The run fails with a RaceError whose cause is that IndexError."""
    engine = _engine(tiny64, host, buffers={"name": "stuck", "num_slots": 3}, runtime={"order": "timed"})
    with pytest.raises(RaceError) as info:
        _generate(engine, _work(6))

    assert IndexError is type(info.value.__cause__)
    assert str(info.value).startswith("the run failed with IndexError: ")
    assert "the race most likely corrupted its data and caused it" in str(info.value)
    assert SLOT_EDGES == info.value.report.edges()
    with pytest.raises(RaceError) as again:  # the engine's own call sees the sim's RaceError: passed on as is
        raise_if_racy(engine.runtime, info.value)
    assert info.value is again.value


def test_a_failure_after_a_race_is_reported_as_the_race(tiny64, host):
    engine = _engine(tiny64, host, buffers="stuck", runtime={"order": "timed"})
    _racy(engine, MIXED)
    failure = IndexError("index 33 is out of bounds for dimension 0 with size 33")

    with pytest.raises(RaceError) as info:
        raise_if_racy(engine.runtime, failure)

    assert (failure, True) == (info.value.__cause__, isinstance(info.value, AsyncBatchError))
    assert str(info.value).startswith("the run failed with IndexError: index 33 is out of bounds for "
                                      "dimension 0 with size 33; the race most likely corrupted its data and "
                                      "caused it. ")
    assert race_report(engine.runtime) == raise_if_racy(engine.runtime, KeyboardInterrupt())  # never wrapped


def test_a_failure_without_a_race_is_left_to_the_caller(tiny64, host):
    engine = _engine(tiny64, host)
    _generate(engine, MIXED[:3])

    report = raise_if_racy(engine.runtime, IndexError("not a race"))
    assert (0, False) == (report.count, bool(report))


@pytest.mark.parametrize("edge", EDGES)
def test_each_removed_edge_is_reported_as_the_missing_edge(tiny64, edge):
    """The cases of test_edges: without `edge`, every race the checker finds names exactly `edge`."""
    settings, work, split, _ = CASES[edge]
    report = RaceReport.from_conflicts(_conflicts(tiny64, settings, work, split, (edge,), seed=0))

    assert report
    assert {edge: report.count} == report.by_edge()


def test_the_dict_caps_the_listed_pairs_and_keeps_the_counts(tiny64, host):
    engine = _engine(tiny64, host, buffers="stuck")
    _racy(engine, MIXED)
    report = race_report(engine.runtime)
    data = report.to_dict()

    assert report.count > 50
    assert (report.count, 50, report.count - 50) == (data["count"], len(data["pairs"]),
                                                     data["pairs_left_out"])
    assert report.count == sum(data["by_resource"].values()) == sum(data["by_missing_edge"].values())
    assert {"before": {"name": "h2d", "batch": 0, "track": "h2d"}, "after": {"name": "prep", "batch": 1,
            "track": "host"}, "resource": "host_in[slot 0]", "kind": "host_in", "modes": ["read", "write"],
            "owners": None, "missing_edge": "h2d->prep",
            "ordering": "h2d[0] must happen before prep[1] (edge h2d->prep)"} == data["pairs"][0]
    text = str(report).splitlines()
    assert (9, f"  ... and {report.count - 5} more") == (len(text), text[-1])  # 3 lines of counts, 5 pairs


def _conflict(resource, a, b, modes="ww", owners=(None, None)):
    return Conflict(resource, NodeInfo(1, *a), modes[0], NodeInfo(2 if a != b else 1, *b), modes[1], owners)


def test_per_request_resources_and_unknown_ops():
    report = RaceReport.from_conflicts([
        _conflict(("kv", 17), ("comp", "compute", 3), ("comp", "compute", 4), owners=("a", "a")),
        _conflict(("row", 2), ("comp", "compute", 3), ("comp", "compute", 5), owners=("a", "b")),
        _conflict(("kv", 9), ("comp", "compute", 6), ("comp", "compute", 6), owners=("a", "b")),
        _conflict(("lora", 1), ("adapter", "h2d", 2), ("comp", "compute", 3), modes="wr"),
    ])

    assert ["comp->comp", "reuse", None, None] == [p.edge for p in report.pairs]
    assert ["comp[3] must happen before comp[4] (edge comp->comp)",
            "comp[3] must happen before comp[5] (edge reuse)",
            "comp[6] touches kv block 9 for two owners at once: nothing orders accesses inside one op (an "
            "allocation error, not a missing edge)",
            "adapter[2] must happen before comp[3]"] == [p.ordering() for p in report.pairs]
    assert {"comp->comp": 1, "reuse": 1, "(none)": 2} == report.by_edge()


def test_resources_read_as_words():
    resources = [("dev_in", 1), ("kv", 17), ("row", 3), ("graph_pool",), ("lora", 1, 2), "x"]
    assert ["dev_in[slot 1]", "kv block 17", "row 3", "the shared graph pool", "lora[1, 2]", "'x'"] == [
        describe_resource(r) for r in resources]


# ---------------------------------------------------------------- measured host time


def _busy(model, plugins, scheduler, gpu_ms=10.0, **runtime):
    cost = {"gpu_compute_ms": gpu_ms, "launch_eager_ms": 0.5}
    runtime = {"order": "timed", "check": False, "cost": cost, **runtime}
    engine = _engine(model, plugins, scheduler=scheduler, runtime=runtime, max_seqs=4)
    prompts = [[i + 1, i + 2, i + 3, i + 4] for i in range(4)]
    result = engine.run(engine.make_requests(prompts, SamplingParams(max_new_tokens=8)))
    assert 8 == result.summary.steps  # one prefill, seven decodes
    return result.summary.compute_busy_fraction


def test_a_slow_scheduler_starves_the_device_only_when_host_time_is_measured(tiny64, host):
    """Double buffering, 10 ms of compute per step, a scheduler taking 30 ms: the host sets the pace. Over 8
    steps the compute stream is busy at most 8 * 10 / (7 * 30.5 + 10) of the span (launch 0.5 ms); less where
    the machine adds host time of its own. The cost model alone cannot tell; `host_scale` 0.1 (a host 10x
    faster) gives the device back its pace."""
    assert 0.99 < _busy(tiny64, host, "slow_fifo")
    assert 0.1 < _busy(tiny64, host, "slow_fifo", host="measured") < 80 / (7 * 30.5 + 10)
    assert 0.9 < _busy(tiny64, host, "slow_fifo", host="measured", host_scale=0.1)


def test_a_fast_scheduler_keeps_the_device_busy_when_measured(tiny64, host):
    """The engine's own host work is about 1 ms per phase; 50 ms of compute per step (not 10) keeps the
    property about the engine: on a loaded 2-core machine the OS alone adds stalls of up to ~40 ms."""
    assert 0.9 < _busy(tiny64, host, "fifo", gpu_ms=50.0, host="measured", host_scale=1.0)


@pytest.mark.parametrize("value,message", [
    ({"host": "wall"}, "runtime.host: 'wall' is not allowed (valid: measured, model)"),
    ({"host_scale": 0}, "runtime.host_scale: must be a finite number in (0, 1e+06], got 0.0"),
    ({"host_scale": float("nan")}, "runtime.host_scale: must be a finite number in (0, 1e+06], got nan"),
])
def test_bad_host_settings_name_the_key(host, value, message):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"runtime": {"name": "sim", **value}}, host=host)
    assert message == str(info.value)


def test_host_settings_round_trip_from_yaml(host):
    cfg = EngineConfig.from_dict({"runtime": {"name": "sim", "order": "timed", "host": "measured",
                                              "host_scale": 2.5}}, host=host)
    assert ("measured", 2.5) == (cfg.runtime.config.host, cfg.runtime.config.host_scale)


# ---------------------------------------------------------------- the command line


def _racy_yaml(tmp_path, order: str, sweep: str = "") -> str:
    path = tmp_path / f"racy-{order}.yaml"
    path.write_text(
        "name: racy\n"
        "engine:\n"
        "  model: {preset: tiny, dtype: float64, device: cpu}\n"
        f"  runtime: {{name: sim, order: {order}, check: true}}\n"
        "  buffers: stuck\n"
        "  graphs: eager\n"
        "  batch: {max_tokens: 32, max_seqs: 4}\n"
        "  cache: {num_blocks: 48, block_size: 4}\n"
        "workload: {name: synthetic, num_requests: 6, prompt_len: {dist: fixed, value: 5},"
        " output_len: {dist: fixed, value: 4}}\n"
        "output: {plots: false, progress: false}\n" + sweep)
    return str(path)


@pytest.fixture
def cli_host(monkeypatch, host):
    import asyncbatch.core.plugin_host as plugin_host

    monkeypatch.setattr(plugin_host, "_default_host", host)
    return host


@pytest.mark.parametrize("order", ["random", "timed"])
def test_the_command_fails_on_races_and_writes_the_report(cli_host, tmp_path, capsys, order):
    import json

    from asyncbatch.cli import main

    out = tmp_path / "out"
    code = main(["run", _racy_yaml(tmp_path, order), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err

    assert 1 == code
    assert "race(s)" in err and "must happen before" in err and "Traceback" not in err
    races = json.loads((out / "results.json").read_text())["races"]
    assert races["count"] > 0
    assert set(races["by_missing_edge"]) == SLOT_EDGES


def test_a_sweep_runs_every_cell_then_fails_naming_the_racy_ones(cli_host, tmp_path, capsys):
    import json

    from asyncbatch.cli import main

    out = tmp_path / "sweep"
    code = main(["run", _racy_yaml(tmp_path, "random", "sweep: {engine.buffers: [double, stuck]}\n"), "--out",
                 str(out), "--no-progress"])
    err = capsys.readouterr().err

    assert 1 == code
    assert "1 of 2 run(s) had races" in err
    reports = {p.parent.name: json.loads(p.read_text())["races"]["count"] for p in out.glob("cells/*/results.json")}
    assert {"00-buffers=double": 0} == {k: v for k, v in reports.items() if v == 0}
    assert 2 == len(reports) and (out / "sweep.csv").is_file()
