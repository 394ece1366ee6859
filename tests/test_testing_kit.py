"""The public test kit (`asyncbatch.testing`) and its pytest plugin: names come from the plugin host, each
invariant is caught for its own reason and named with the combination, and loading the plugin costs nothing.

The components under test here are defined by the test: a well-behaved LIFO scheduler, two broken ones (one never
admits long prompts, so a request can never be scheduled), and a buffer policy that gives two consecutive batches
one slot (a race)."""

from __future__ import annotations

import importlib.metadata
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import asyncbatch
import asyncbatch.testing.pytest_plugin
from asyncbatch import Output, PluginHost, SamplingParams
from asyncbatch.core.book import RequestBook
from asyncbatch.core.pipeline import PipelineDebug
from asyncbatch.strategies.buffers import NSlot
from asyncbatch.testing import (
    BUFFERS,
    FIXED_GEOMETRY,
    GRAPHS,
    INVARIANTS,
    SCHEDULERS,
    STREAMS,
    Combination,
    DataChooser,
    InvariantError,
    check_component,
    check_engine,
    combinations,
    component_specs,
    engine_dict,
    every_combination,
    fixed_workload,
    reference_tokens,
)
from asyncbatch.testing.combos import FIELDS, builtin_host, spec_name
from asyncbatch.testing.invariants import limit_violations, token_mismatches

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]


class NewestFirst(asyncbatch.Scheduler):
    """Decode first, then split prompts, then new requests newest first (a correct, unusual order)."""

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def schedule(self, state: asyncbatch.SchedulingState) -> None:
        for req in state.running:
            if req.is_decode:
                state.add(req, 1)
        for req in state.running:
            if req.is_prefill and state.token_budget > 0:
                state.add(req, state.max_chunk(req))
        for req in reversed(state.waiting):
            if state.token_budget == 0 or not state.add(req, state.max_chunk(req)):
                break


class ShortOnly(NewestFirst):
    """Broken on purpose: never admits a request with more than 8 tokens to feed."""

    def schedule(self, state: asyncbatch.SchedulingState) -> None:
        for req in state.running:
            state.add(req, 1 if req.is_decode else state.max_chunk(req))
        for req in state.waiting:
            if req.num_remaining <= 8:
                state.add(req, state.max_chunk(req))


class Pairs(NSlot):
    """Broken on purpose: two consecutive batches share a slot."""

    def slot_for(self, batch_index: int) -> int:
        return (batch_index // 2) % self.num_slots


class KitPlugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        register("newest_first", NewestFirst)
        register("short_only", ShortOnly)

    @asyncbatch.hookimpl
    def asyncbatch_register_buffer_policies(self, register: Any) -> None:
        register("pairs", Pairs)


HOST = PluginHost.create(extra_plugins=[KitPlugin()], load_entry_points=False)
GREEDY = [([(7 * i + j) % 512 for j in range(2 + 3 * i)], SamplingParams(max_new_tokens=5)) for i in range(6)]


# ---------------------------------------------------------------- combinations come from the registries


def test_builtin_combinations_are_every_builtin_in_the_suites_variants():
    for field, family in FIELDS.items():
        specs = component_specs(field)
        assert builtin_host().registry(family).names() == sorted({spec_name(s) for s in specs}), field
    assert BUFFERS == component_specs("buffer_policy")  # the n_slot variants, simplest first
    assert (STREAMS, GRAPHS, SCHEDULERS) == tuple(component_specs(f)[:len(b)] for f, b in
                                                  [("streams", STREAMS), ("graphs", GRAPHS), ("scheduler", SCHEDULERS)])
    choices = [component_specs(f) for f in FIELDS]
    assert [Combination(*c) for c in itertools.product(*choices)] == every_combination()


def test_plugin_components_join_only_when_included():
    builtin = component_specs("scheduler")

    assert builtin == component_specs("scheduler", HOST)
    assert builtin + ["newest_first", "short_only"] == component_specs("scheduler", HOST, include="KitPlugin")
    assert component_specs("scheduler", HOST, include="all") == component_specs("scheduler", HOST,
                                                                                include=["KitPlugin"])
    assert BUFFERS + ["pairs"] == component_specs("buffers", HOST, include=["KitPlugin"])
    with pytest.raises(ValueError, match=r"no plugin of this host: \['Kit'\].*KitPlugin"):
        component_specs("scheduler", HOST, include=["Kit"])


def test_the_combination_strategy_draws_included_and_pinned_specs():
    drawn = find(combinations(HOST, include=["KitPlugin"]), lambda c: c.scheduler == "newest_first")
    assert Combination("single", "one", "eager", "newest_first") == drawn  # shrunk towards the simplest others

    pinned = combinations(only={"scheduler": [{"name": "newest_first"}], "graph_policy": "staged"})
    with pytest.raises(NoSuchExample):
        find(pinned, lambda c: c.scheduler != {"name": "newest_first"} or c.graphs != "staged")
    assert 12 == len(every_combination(only={"scheduler": "fifo", "graphs": "eager"}))


def test_a_combination_names_itself_and_builds_its_engine_mapping():
    combo = Combination({"name": "n_slot", "num_slots": 3}, "one", "mixed", "fifo")
    config = combo.config(max_tokens=8)

    assert "buffers=n_slot(num_slots=3) streams=one graphs=mixed scheduler=fifo" == str(combo)
    assert {"name": "sdpa", "static_shapes": True} == config["attention"]  # mixed captures prefill steps
    assert ({"max_tokens": 8, "max_seqs": 8}, "sim") == (config["batch"], config["runtime"])
    with pytest.raises(ValueError, match="a combination varies buffers"):
        every_combination(only={"attention": "sdpa"})


# ---------------------------------------------------------------- the chooser


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(2, 50))
def test_data_chooser_picks_in_range_and_outlives_its_draw_budget(data, n):
    chooser = DataChooser(data, max_draws=4)

    picks = [chooser.choose(n) for _ in range(10)]

    assert [True] * 10 == [0 <= p < n for p in picks]
    assert (0, 10) == (chooser.choose(1), chooser.draws)  # one alternative: nothing drawn, nothing counted


# ---------------------------------------------------------------- check_engine: passes, and each invariant


def test_check_engine_passes_a_correct_combination_and_returns_the_run(tiny64):
    config = engine_dict("double", "three", "per_slot", "newest_first", **FIXED_GEOMETRY)

    checked = check_engine(tiny64, config, fixed_workload(), host=HOST, seed=3)

    assert reference_tokens(tiny64, config, fixed_workload(), host=HOST) == checked.expected
    assert checked.expected == tuple(o.token_ids for o in checked.result.outputs)
    assert ("newest_first", "sim") == (checked.engine.config.scheduler.name, checked.engine.runtime.name)


def test_a_missing_edge_is_a_race_naming_the_combination(tiny64):
    config = engine_dict("double", "three", "eager", "fifo")

    with pytest.raises(InvariantError) as failed:
        check_engine(tiny64, config, GREEDY, debug=PipelineDebug(disabled_edges=frozenset(["comp->d2h"])))

    assert "no race" == failed.value.invariant
    assert failed.value.combination.startswith("buffers=double streams=three graphs=eager scheduler=fifo")
    assert "dev_out" in failed.value.details and "comp->d2h" in failed.value.details
    assert str(failed.value).startswith("invariant 'no race' violated\n  engine: buffers=double")


def test_a_request_the_scheduler_never_schedules_fails_every_request_ends(tiny64):
    work = [([1, 2, 3], SamplingParams(max_new_tokens=3)), (list(range(20)), SamplingParams(max_new_tokens=3))]

    with pytest.raises(InvariantError) as failed:
        check_engine(tiny64, engine_dict("double", "three", "eager", "short_only"), work, host=HOST)

    assert "every request ends" == failed.value.invariant
    assert "request '1' ended 'error'" in failed.value.details and "cannot be scheduled" in failed.value.details


def test_a_run_that_does_not_end_is_stopped_and_named(tiny64):
    with pytest.raises(InvariantError, match=r"did not end within 3 batches") as failed:
        check_engine(tiny64, engine_dict("double", "three", "eager", "fifo"), GREEDY, max_batches=3)

    assert "every request ends" == failed.value.invariant


def test_a_request_going_past_its_stop_token_breaks_the_finish_limits(tiny64, monkeypatch):
    """An engine bookkeeping bug, simulated: stop ids are forgotten when tokens arrive. The reference has the same
    bug (same tokens), so only the finish limits catch it."""
    config = engine_dict("double", "three", "eager", "fifo")
    prompt = GREEDY[3][0]
    greedy = reference_tokens(tiny64, config, [(prompt, SamplingParams(max_new_tokens=6))])[0]
    stop = greedy[1]
    original = RequestBook.apply_token

    def forgetting_stops(self, entry, token, now):
        entry.req.stop_ids = frozenset()
        return original(self, entry, token, now)

    monkeypatch.setattr(RequestBook, "apply_token", forgetting_stops)
    with pytest.raises(InvariantError) as failed:
        check_engine(tiny64, config, [(prompt, SamplingParams(max_new_tokens=6, stop_token_ids=(stop,)))])

    assert "finish limits" == failed.value.invariant
    assert f"request '0': went on past stop token {stop} at index {greedy.index(stop)}" == failed.value.details


def test_tokens_differing_from_the_reference_are_named(tiny64):
    config = engine_dict("single", "one", "eager", "fifo")
    expected = list(reference_tokens(tiny64, config, GREEDY))
    expected[2] = expected[2][:3] + (511,) + expected[2][4:]

    with pytest.raises(InvariantError) as failed:
        check_engine(tiny64, config, GREEDY, reference=expected)

    assert "reference tokens" == failed.value.invariant
    assert failed.value.details.startswith("request '2' (greedy): differs from token 3 on: expected [511")


def test_an_invalid_workload_is_a_mistake_in_the_test_not_an_invariant(tiny64):
    with pytest.raises(ValueError, match=r"(?s)workload is invalid.*request '0'.*outside the vocabulary"):
        check_engine(tiny64, engine_dict("double", "three", "eager", "fifo"), [([512], SamplingParams())])


def test_invariants_are_listed_in_checking_order():
    assert ("no race", "every request ends", "finish limits", "reference tokens") == INVARIANTS


def _out(tokens: tuple[int, ...], reason: str, prompt: int = 2) -> Output:
    return Output("r", tuple(range(prompt)), tokens, reason)


def test_finish_limits():
    cases = [
        (_out((1, 2, 3), "length"), SamplingParams(max_new_tokens=3), None),
        (_out((1, 7), "stop"), SamplingParams(max_new_tokens=3), None),  # EOS 7 ends a request
        (_out((4,), "length", prompt=99), SamplingParams(max_new_tokens=3), None),  # the context is full at 100
        (_out((1, 2, 3, 4), "length"), SamplingParams(max_new_tokens=3), "4 tokens, max_new_tokens=3"),
        (_out((1, 2, 3), "length"), SamplingParams(max_new_tokens=3, stop_token_ids=(2,)),
         "went on past stop token 2 at index 1"),
        (_out((1, 3), "stop"), SamplingParams(stop_token_ids=(2,)), "ended 'stop' on (3,), stop ids [2, 7]"),
        (_out((1, 7), "stop"), SamplingParams(ignore_eos=True), "ended 'stop' on (7,), stop ids []"),
        (_out((1, 2), "length"), SamplingParams(max_new_tokens=2, stop_token_ids=(2,)),
         "ended 'length' on stop token 2"),
        (_out((1,), "length"), SamplingParams(max_new_tokens=3), "ended 'length' after 1 of max_new_tokens=3, below the context limit 100"),
    ]
    for out, params, why in cases:
        found = limit_violations([out], [params], eos_ids=(7,), max_len=100)
        assert ([] if why is None else [why]) == [f.split(": ", 1)[1] for f in found], (out, params)


def test_token_comparison_covers_greedy_and_seeded_requests_only():
    outputs = [Output(str(i), (0,), (1, 2), "length") for i in range(3)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=4), SamplingParams(temperature=0.8)]

    found = token_mismatches(outputs, params, [(1, 3)] * 3)

    assert ["request '0' (greedy): differs from token 1 on: expected [3], got [2] (2 vs 2 tokens)",
            "request '1' (sampled, seed 4): differs from token 1 on: expected [3], got [2] (2 vs 2 tokens)"] == found


# ---------------------------------------------------------------- one component against every built-in


def test_check_component_runs_a_correct_scheduler_with_every_builtin(tiny64):
    results = check_component(tiny64, "scheduler", "newest_first", host=HOST)

    others = every_combination(only={"scheduler": "newest_first"})
    assert len(others) == len(results) == len(BUFFERS) * len(component_specs("streams")) * len(
        component_specs("graphs"))
    assert {"newest_first"} == {r.engine.config.scheduler.name for r in results}
    assert 1 == len({r.expected for r in results})  # one reference for all


def test_check_component_names_the_broken_component(tiny64):
    with pytest.raises(InvariantError) as failed:
        check_component(tiny64, "buffer_policy", "pairs", host=HOST)

    assert ("no race", "buffers=pairs streams=one graphs=eager scheduler=fifo") == (
        failed.value.invariant, " ".join(failed.value.combination.split()[:4]))


# ---------------------------------------------------------------- the pytest plugin


def test_the_pytest_plugin_is_declared_installed_and_loaded(pytestconfig):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")
                 if ep.dist is not None and ep.dist.name == "asyncbatch"}

    assert {"asyncbatch": "asyncbatch.testing.pytest_plugin"} == project["entry-points"]["pytest11"] == installed
    assert asyncbatch.testing.pytest_plugin is pytestconfig.pluginmanager.get_plugin("asyncbatch")


def test_loading_the_plugin_imports_neither_torch_nor_hypothesis():
    code = ("import sys; import asyncbatch.testing, asyncbatch.testing.pytest_plugin; "
            "from asyncbatch.testing import engine_dict, every_combination; every_combination(); "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'hypothesis'}); "
            "assert not bad, bad; "
            # Without hypothesis installed, the plugin and the checker still import.
            "sys.modules['hypothesis'] = None; from asyncbatch.testing import check_engine, Checker")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


PLUGIN_TESTS = '''
import torch
from hypothesis import Phase, settings

import asyncbatch
from asyncbatch import PluginHost
from asyncbatch.testing import engine_dict, fixed_workload, invariant_test

settings.register_profile("no_shrink", phases=[Phase.explicit, Phase.generate], derandomize=True)
settings.load_profile("no_shrink")


class ShortOnly(asyncbatch.Scheduler):
    def __init__(self, config=None):
        pass

    def schedule(self, state):
        for req in state.running:
            state.add(req, 1 if req.is_decode else state.max_chunk(req))
        for req in state.waiting:
            if req.num_remaining <= 8:
                state.add(req, state.max_chunk(req))


class Plugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register):
        register("short_only", ShortOnly)


test_fifo = invariant_test("scheduler", "fifo", {"name": "priority"}, max_examples=3)
test_short_only = invariant_test(
    "scheduler", "short_only", max_examples=5,
    host=PluginHost.create(extra_plugins=[Plugin()], load_entry_points=False))


def test_fixtures(asyncbatch_check, asyncbatch_model_factory, asyncbatch_tiny_model, asyncbatch_host):
    assert asyncbatch_model_factory("tiny", "float64") is asyncbatch_tiny_model
    assert torch.float64 == next(asyncbatch_tiny_model.parameters()).dtype
    assert "fifo" in asyncbatch_host.registry("scheduler")
    checked = asyncbatch_check(engine_dict("double", "three", "per_slot", "fifo"), fixed_workload())
    assert 10 == len(checked.result.outputs)
'''


def test_plugin_fixtures_and_generated_tests_in_a_fresh_pytest(pytester):
    pytester.makepyfile(test_plugin_kit=PLUGIN_TESTS)

    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_short_only*", "*invariant 'every request ends' violated*",
                                 "*engine: buffers=* scheduler=short_only*", "*cannot be scheduled*"])


def test_the_plugin_can_be_switched_off(pytester):
    pytester.makepyfile("def test_needs_the_kit(asyncbatch_host):\n    pass\n")

    result = pytester.runpytest_subprocess("-q", "-p", "no:asyncbatch", "-p", "no:cacheprovider")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'asyncbatch_host' not found*"])

