"""What a plugin gets wrong is named, never skipped in silence or reported as asyncbatch's own failure: two
distributions declaring one entry point, a hook implementation whose arguments are not its spec's, a hook name
with a typo, a stream topology that runs a role on a stream it never creates, a workload that returns something
else than distinct requests; and plugin configs that attrs accepts (a field without an annotation, an `assert` in
`__attrs_post_init__`) are structured or refused with the key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_plugins import _write_dist

import asyncbatch
from asyncbatch import Engine, EngineConfig
from asyncbatch.core.errors import ConfigError, PluginError
from asyncbatch.core.interfaces import StreamTopology
from asyncbatch.core.plugin_host import PluginHost, reset_plugin_host
from asyncbatch.core.types import Request, SamplingParams
from asyncbatch.plugins.workloads import checked_requests


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A directory on sys.path where tests "install" distributions; the default host rescans around the test."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    reset_plugin_host()
    yield root
    reset_plugin_host()
    for name in [m for m in sys.modules if m.startswith("contract_plugin")]:
        del sys.modules[name]


def _module(site: Path, name: str, body: str) -> None:
    (site / f"{name}.py").write_text("import asyncbatch\n\n" + body)


def test_two_distributions_declaring_one_entry_point_are_refused_naming_both(site: Path) -> None:
    _module(site, "contract_plugin_a", "")
    _module(site, "contract_plugin_b", "")
    _write_dist(site, "contract-a", "1.0", {"contract_ep": "contract_plugin_a"})
    _write_dist(site, "contract-b", "1.0", {"contract_ep": "contract_plugin_b"})

    with pytest.raises(PluginError, match=r"both contract-\w and contract-\w declare the entry point 'contract_ep'"):
        PluginHost.create()


def test_a_hook_with_arguments_its_spec_lacks_is_a_plugin_error(site: Path) -> None:
    _module(site, "contract_plugin_sig", "@asyncbatch.hookimpl\ndef asyncbatch_register_schedulers(reg):\n    pass\n")
    _write_dist(site, "contract-sig", "1.0", {"contract_sig": "contract_plugin_sig"})

    with pytest.raises(PluginError, match=r"plugin 'contract_sig' failed to register from entry point "
                                          r"contract_plugin_sig: PluginValidationError: .*'reg'"):
        PluginHost.create()


def test_a_hook_name_with_a_typo_is_refused_listing_the_hooks() -> None:
    class Typo:
        @asyncbatch.hookimpl
        def asyncbatch_register_scheduler(self, register: Any) -> None:  # the spec's name ends in -s
            raise AssertionError("never called")

    with pytest.raises(PluginError, match=r"plugin 'Typo' failed the hook check: .*unknown hook "
                                          r"'asyncbatch_register_scheduler'.*asyncbatch_register_schedulers") as e:
        PluginHost.create(extra_plugins=[Typo()], load_entry_points=False)
    assert "asyncbatch_register_scheduler," not in str(e.value).split("asyncbatch hooks:")[1]


class Misnamed(StreamTopology):
    streams = ("copy",)

    def stream_for(self, role: str) -> str:
        return "copy" if role != "compute" else "math"


class Topologies:
    @asyncbatch.hookimpl
    def asyncbatch_register_stream_topologies(self, register: Any) -> None:
        register("misnamed", lambda _config: Misnamed())


@pytest.mark.parametrize("runtime", ["cpu", "sim"])
def test_a_topology_running_a_role_on_a_stream_it_does_not_create_is_refused(runtime: str) -> None:
    host = PluginHost.create(extra_plugins=[Topologies()], load_entry_points=False)
    config = EngineConfig.from_dict({"runtime": runtime, "streams": "misnamed"}, host=host)

    with pytest.raises(ConfigError, match=r"engine.streams: stream topology 'misnamed' runs compute on stream "
                                          r"'math', which it does not create \(its streams: 'copy'\)"):
        Engine.from_config(config, host=host)


@attrs.frozen
class Untyped:
    k = attrs.field(default=1)


@attrs.frozen
class Asserting:
    k: int = 1

    def __attrs_post_init__(self) -> None:
        assert self.k < 10, "k must stay under 10"


class Schedulers:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        from asyncbatch.strategies.schedulers import Fifo

        register("untyped", lambda _config: Fifo(), config=Untyped)
        register("asserting", lambda _config: Fifo(), config=Asserting)


def test_plugin_configs_attrs_accepts_are_structured_or_refused_with_the_key() -> None:
    host = PluginHost.create(extra_plugins=[Schedulers()], load_entry_points=False)

    assert 2 == EngineConfig.from_dict({"scheduler": {"name": "untyped", "k": 2}}, host=host).scheduler.config.k
    with pytest.raises(ConfigError, match=r"^engine\.scheduler: k must stay under 10$|^scheduler: k must stay"):
        EngineConfig.from_dict({"scheduler": {"name": "asserting", "k": 12}}, host=host)


def test_a_workload_must_return_distinct_requests() -> None:
    req = Request("a", (1, 2), SamplingParams())

    assert [req] == checked_requests((req,), "mine")
    with pytest.raises(ConfigError, match=r"workload 'mine' must return a list of asyncbatch Requests, got NoneType"):
        checked_requests(None, "mine")
    with pytest.raises(ConfigError, match=r"got dict"):
        checked_requests([req, {"prompt": [1]}], "mine")
    with pytest.raises(ConfigError, match=r"workload 'mine' returned request id 'a' more than once"):
        checked_requests([req, Request("a", (3,), SamplingParams())], "mine")


def _boom_class() -> type:
    from asyncbatch.strategies.schedulers import Fifo

    class Boom(Fifo):
        """Fails on its third batch, like a plugin with a bug."""

        calls = 0

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            type(self).calls += 1
            if type(self).calls == 3:
                raise RuntimeError("scheduler bug on call 3")
            return super().schedule(*args, **kwargs)

    return Boom


class BoomPlugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        register("boom", _boom_class())


def test_a_plugin_strategy_that_raises_during_a_run_is_named_with_its_plugin(tiny32: Any) -> None:
    host = PluginHost.create(extra_plugins=[BoomPlugin()], load_entry_points=False)
    engine = Engine.from_model(tiny32, EngineConfig.from_dict({"runtime": "cpu", "scheduler": "boom"}, host=host),
                               host=host)

    with pytest.raises(asyncbatch.core.errors.ComponentError,
                       match=r"scheduler 'boom' of plugin 'BoomPlugin' raised RuntimeError: scheduler bug on call 3"):
        engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=8))


class NoVictimPlugin:
    @asyncbatch.hookimpl
    def asyncbatch_register_schedulers(self, register: Any) -> None:
        from asyncbatch.strategies.schedulers import Fifo

        class NoVictim(Fifo):
            def preemption_victim(self, candidates: Any) -> Any:
                return None

        register("no_victim", NoVictim)


def test_a_preemption_victim_that_is_not_a_candidate_is_named(tiny32: Any) -> None:
    host = PluginHost.create(extra_plugins=[NoVictimPlugin()], load_entry_points=False)
    cfg = {"runtime": "cpu", "scheduler": "no_victim", "cache": {"num_blocks": 6, "block_size": 4}}
    engine = Engine.from_model(tiny32, EngineConfig.from_dict(cfg, host=host), host=host)

    with pytest.raises(asyncbatch.core.errors.StrategyError,
                       match=r"scheduler NoVictim: preemption_victim returned None, not one of the \d+ running"):
        engine.generate([[1, 2, 3, 4, 5]] * 4, SamplingParams(max_new_tokens=12, ignore_eos=True))
