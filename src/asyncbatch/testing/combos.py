"""Engine combinations: one component of each family (buffers × streams × graphs × scheduler), named as in YAML.

The names come from a plugin host's registries, so a plugin's components join the built-ins when asked for. No
hypothesis here: `asyncbatch.testing.strategies` draws from these lists, `check_component` walks them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ..core.plugin_host import DEFAULT_PLUGINS

if TYPE_CHECKING:
    from ..core.plugin_host import PluginHost

#: A component as the engine mapping names it: a registered name, or ``{"name": ..., **params}``.
Spec = str | Mapping[str, Any]

#: Engine key -> registry family, for the four families a combination varies.
FIELDS: dict[str, str] = {
    "buffers": "buffer_policy",
    "streams": "stream_topology",
    "graphs": "graph_policy",
    "scheduler": "scheduler",
}

# The built-ins in the variants the suite has always tried, simplest first (hypothesis shrinks towards the
# first): `n_slot` at 3 and 4 slots, since `double` already is 2.
BUFFERS: list[Spec] = ["single", "double", {"name": "n_slot", "num_slots": 3}, {"name": "n_slot", "num_slots": 4}]
STREAMS: list[Spec] = ["one", "two", "three"]
GRAPHS: list[Spec] = ["eager", "per_slot", "staged", "mixed"]
SCHEDULERS: list[Spec] = ["fifo", "prefill_first", "shortest_first", "priority"]
_BUILTIN_SPECS: dict[str, list[Spec]] = {"buffers": BUFFERS, "streams": STREAMS, "graphs": GRAPHS,
                                         "scheduler": SCHEDULERS}

#: Cache and batch geometries: roomy, tight enough to force preemption, and small token budgets that split prompts.
GEOMETRIES: list[dict[str, int]] = [
    {"max_tokens": 64, "max_seqs": 16, "num_blocks": 200, "block_size": 8},
    {"max_tokens": 32, "max_seqs": 8, "num_blocks": 30, "block_size": 4},
    {"max_tokens": 8, "max_seqs": 4, "num_blocks": 40, "block_size": 4},
    {"max_tokens": 16, "max_seqs": 2, "num_blocks": 16, "block_size": 4},
]


def spec_name(spec: Spec) -> str:
    """The registered name a spec refers to."""
    return spec if isinstance(spec, str) else str(spec["name"])


def spec_text(spec: Spec) -> str:
    """A spec as a short label: ``n_slot(num_slots=3)``."""
    if isinstance(spec, str):
        return spec
    params = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({params})"


def field_of(family: str) -> str:
    """The engine key of a family, given either spelling (`buffers` or `buffer_policy`)."""
    if family in FIELDS:
        return family
    for field, registry_family in FIELDS.items():
        if registry_family == family:
            return field
    raise ValueError(f"a combination varies {', '.join(FIELDS)} (or {', '.join(FIELDS.values())}); got {family!r}")


@attrs.frozen
class Combination:
    """One component per family. `str()` is the label failure messages use."""

    buffers: Spec
    streams: Spec
    graphs: Spec
    scheduler: Spec

    def config(self, **kwargs: Any) -> dict[str, Any]:
        """The engine mapping of this combination (`engine_dict`'s keyword arguments pass through)."""
        return engine_dict(self.buffers, self.streams, self.graphs, self.scheduler, **kwargs)

    def __str__(self) -> str:
        return " ".join(f"{f}={spec_text(getattr(self, f))}" for f in FIELDS)


def engine_dict(buffers: Spec, streams: Spec, graphs: Spec, scheduler: Spec, *, max_tokens: int = 32,
                max_seqs: int = 8, num_blocks: int = 48, block_size: int = 4, runtime: str = "sim") -> dict[str, Any]:
    """An engine mapping for the tiny float64 preset on the CPU with the given components and geometry.

    Under `graphs: mixed` the attention is `sdpa` with static shapes: steps holding prefill chunks are captured
    only with an attention launch fixed by padded counts."""
    attention: Spec = {"name": "sdpa", "static_shapes": True} if spec_name(graphs) == "mixed" else "auto"
    return {
        "model": {"preset": "tiny", "dtype": "float64", "device": "cpu"},
        "runtime": runtime, "buffers": buffers, "streams": streams, "graphs": graphs, "scheduler": scheduler,
        "attention": attention, "batch": {"max_tokens": max_tokens, "max_seqs": max_seqs},
        "cache": {"num_blocks": num_blocks, "block_size": block_size},
    }


@functools.lru_cache(maxsize=1)
def builtin_host() -> PluginHost:
    """A host with the built-in components only (no entry points): what `host=None` means here."""
    from ..core.plugin_host import PluginHost

    return PluginHost.create(load_entry_points=False)


def component_specs(family: str, host: PluginHost | None = None, *,
                    include: Iterable[str] | Literal["all"] = ()) -> list[Spec]:
    """The specs of `family` a combination may take: the built-ins (parameterised ones in their tested variants),
    then, in name order, the components `host` registered from the plugins named in `include` (one name or
    several, as `Component.plugin` names them; `"all"`: every plugin). A plugin component is tried with its config's defaults; pin other parameters with `only=`.

    Raises ValueError for a plugin name `host` does not know."""
    field = field_of(family)
    host = host or builtin_host()
    if include != "all":
        include = {include} if isinstance(include, str) else set(include)
        unknown = include - set(host.plugin_names())
        if unknown:
            raise ValueError(f"include names no plugin of this host: {sorted(unknown)} "
                             f"(plugins: {', '.join(host.plugin_names())})")
    registry = host.registry(FIELDS[field])
    specs = [s for s in _BUILTIN_SPECS[field] if spec_name(s) in registry]
    named = {spec_name(s) for s in specs}
    for component in registry:  # built-ins the table above does not know yet, with their defaults
        if component.plugin in DEFAULT_PLUGINS and component.name not in named:
            specs.append(component.name)
    for component in registry:
        if component.plugin not in DEFAULT_PLUGINS and (include == "all" or component.plugin in include):
            specs.append(component.name)
    return specs


def family_choices(host: PluginHost | None = None, *, include: Iterable[str] | Literal["all"] = (),
                   only: Mapping[str, Spec | Sequence[Spec]] | None = None) -> dict[str, list[Spec]]:
    """Per engine key, the specs a combination may take: `component_specs`, except where `only` gives the specs
    (one or a list) for a family, under either spelling of its name."""
    choices = {field: component_specs(field, host, include=include) for field in FIELDS}
    for family, specs in (only or {}).items():
        field = field_of(family)
        choices[field] = [specs] if isinstance(specs, (str, Mapping)) else list(specs)
        if not choices[field]:
            raise ValueError(f"only[{family!r}] is empty")
    return choices


def every_combination(host: PluginHost | None = None, *, include: Iterable[str] | Literal["all"] = (),
                      only: Mapping[str, Spec | Sequence[Spec]] | None = None) -> list[Combination]:
    """The product of `family_choices`, buffers varying slowest (the order of the suite's parametrized tests)."""
    choices = family_choices(host, include=include, only=only)
    return [Combination(*c) for c in itertools.product(*(choices[f] for f in FIELDS))]
