"""`ComponentSpec`: how a config names one registered component and carries that component's own config.

In YAML a component is a bare name (`scheduler: fifo`) or a mapping with `name` and the component's parameters
(`buffers: {name: n_slot, num_slots: 3}`). `ComponentSpec.resolve` checks the name against its family's
registry and has the component structure and validate its parameters, so a wrong name or key fails at load time
naming the dotted key and the valid choices.
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import ConfigError
from .structure import unstructure
from .types import show


@attrs.frozen
class ComponentSpec:
    """A registered component chosen by name, with its own validated config (None if it takes none)."""

    name: str
    config: Any = None

    @classmethod
    def resolve(cls, family: str, value: Any, key: str, host: Any = None) -> ComponentSpec:
        """YAML `name` or `{name: ..., **params}` -> spec, checked against the `family` registry."""
        if isinstance(value, ComponentSpec):
            return value
        if host is None:
            from .plugin_host import get_plugin_host  # noqa: PLC0415

            host = get_plugin_host()
        if isinstance(value, str):
            name, params = value, {}
        elif isinstance(value, dict):
            params = dict(value)
            if "name" not in params:
                raise ConfigError(f"{key}.name", "missing: every component needs a name")
            name = params.pop("name")
            if not isinstance(name, str):
                raise ConfigError(f"{key}.name", f"expected a string, got {show(name)}")
        else:
            hint = " (YAML reads on/off/yes/no as true/false)" if isinstance(value, bool) else ""
            raise ConfigError(key, f"expected a component name or a mapping with 'name', got {show(value)}{hint}",
                              host.registry(family).names())
        registry = host.registry(family)
        component = registry.get(name, key if isinstance(value, str) else f"{key}.name")
        return cls(name, registry.config_of(component, params, key))  # a misplaced setting names who takes it

    def __unstructure__(self) -> dict[str, Any]:
        """The YAML form: `{name: ..., **params}` (structure.unstructure calls this, so it needs no import of
        this module)."""
        out = {"name": self.name}
        if self.config is not None:
            out.update(unstructure(self.config))
        return out
