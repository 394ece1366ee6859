"""One registry per component family, keyed by the name used in YAML.

Registries are filled only through the `asyncbatch_register_*` hooks (see `hookspecs`); built-ins use the same
hooks as third-party plugins. A component is a factory (usually a class) plus its frozen attrs config class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs

from .errors import ConfigError, UnknownComponent

FAMILIES: tuple[str, ...] = (
    "scheduler",
    "buffer_policy",
    "stream_topology",
    "graph_policy",
    "attention_backend",
    "prefix_cache",
    "runtime",
    "model_preset",
    "workload",
)


@attrs.frozen
class Component:
    """A registered component: `factory(config, **runtime_objects)` builds it from its own config only."""

    family: str
    name: str
    factory: Callable[..., Any]
    config_cls: type | None
    plugin: str
    description: str = ""

    def make_config(self, params: dict[str, Any], key: str) -> Any:
        """Build this component's config from YAML parameters, naming `key` in every error."""
        if self.config_cls is None or not any(f.init for f in attrs.fields(self.config_cls)):
            if params:  # said in words: "unknown key (valid: none)" reads as if `none` were a key
                raise ConfigError(f"{key}.{next(iter(params))}", f"unknown key: {self.family} {self.name!r} takes "
                                                                 f"no settings besides `name`")
            return None if self.config_cls is None else self.config_cls()
        from .structure import structure  # noqa: PLC0415

        return structure(self.config_cls, params, key)


class Registry:
    """Name -> Component for one family. Duplicate names are refused; a miss lists the registered names."""

    def __init__(self, family: str) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
        self.family = family
        self._items: dict[str, Component] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        plugin: str,
        config: type | None = None,
        description: str = "",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.family} names must be non-empty strings, got {name!r} from plugin {plugin!r}")
        if name in self._items:
            other = self._items[name].plugin
            raise ValueError(f"{self.family} {name!r} registered twice: by plugin {other!r} and by {plugin!r}")
        if config is None:
            config = getattr(factory, "Config", None)
        if config is not None and not attrs.has(config):
            raise TypeError(f"{self.family} {name!r}: config must be an attrs class, got {config!r}")
        doc = description or " ".join((factory.__doc__ or "").strip().split("\n\n")[0].split())
        self._items[name] = Component(self.family, name, factory, config, plugin, doc)

    def get(self, name: str, key: str | None = None) -> Component:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownComponent(self.family, name, list(self._items), key) from None

    def config_of(self, component: Component, params: dict[str, Any], key: str) -> Any:
        """`component.make_config(params, key)`; a key that this component lacks but others of the family take
        (`engine.buffers.num_slots` with `buffers: double`) says which, since the fix is another `name`."""
        try:
            return component.make_config(params, key)
        except ConfigError as exc:
            unknown = exc.message.startswith("unknown key")
            field = exc.key[len(key) + 1:] if exc.key.startswith(f"{key}.") else ""
            takers = [c.name for c in self if c.name != component.name and c.config_cls is not None
                      and field in attrs.fields_dict(c.config_cls)] if unknown and "." not in field else []
            if not takers:
                raise
            which = f"to {takers[0]}" if len(takers) == 1 else "to one of them"
            raise ConfigError(exc.key, f"{self.family} {component.name!r} has no setting {field!r}; "
                              f"{' and '.join(takers)} {'has' if len(takers) == 1 else 'have'} it: set "
                              f"{key}.name {which}", exc.valid or None) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Component]:
        return iter(self._items[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._items)
