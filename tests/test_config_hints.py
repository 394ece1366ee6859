"""A setting given to the wrong component of a family says which components take it: the fix is another name."""

from __future__ import annotations

import attrs
import pytest

from asyncbatch.core.config import EngineConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.registry import Registry


@pytest.mark.parametrize(("section", "expected"), [
    ({"buffers": {"name": "double", "num_slots": 3}},
     "engine.buffers.num_slots: buffer_policy 'double' has no setting 'num_slots'; n_slot has it: set "
     "engine.buffers.name to n_slot"),
    ({"attention": {"name": "auto", "fuse_cache_write": "always"}},
     "engine.attention.fuse_cache_write: attention_backend 'auto' has no setting 'fuse_cache_write'; triton has "
     "it: set engine.attention.name to triton"),
])
def test_a_setting_of_another_component_names_the_components_that_take_it(section, expected):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"model": {"preset": "tiny", "device": "cpu"}, **section}, key="engine")
    assert expected == str(info.value)


def test_a_key_no_component_takes_stays_an_unknown_key_with_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"model": {"preset": "tiny", "device": "cpu"},
                                "scheduler": {"name": "fifo", "no_such_key": 1}}, key="engine")
    assert "engine.scheduler.no_such_key: unknown key (valid: chunked_prefill)" == str(info.value)


@attrs.frozen
class _Wide:
    depth: int = 1


@attrs.frozen
class _Deep:
    depth: int = 2
    width: int = 3


def test_several_takers_are_listed_and_a_bad_value_of_a_known_key_is_left_alone():
    registry = Registry("buffer_policy")
    registry.register("plain", object, plugin="t", config=None)
    registry.register("wide", object, plugin="t", config=_Wide)
    registry.register("deep", object, plugin="t", config=_Deep)
    with pytest.raises(ConfigError) as info:
        registry.config_of(registry.get("plain"), {"depth": 4}, "engine.buffers")
    assert ("engine.buffers.depth: buffer_policy 'plain' has no setting 'depth'; deep and wide have it: set "
            "engine.buffers.name to one of them") == str(info.value)
    with pytest.raises(ConfigError) as info:
        registry.config_of(registry.get("wide"), {"depth": "x"}, "engine.buffers")
    assert "engine.buffers.depth: expected an int, got str 'x'" == str(info.value)
