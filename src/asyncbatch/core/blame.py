"""Which plugin strategy a failed run failed in. The engine calls `blame` with the exception of a failed run; if
the innermost frame that belongs to one of its strategies belongs to a plugin's (not a built-in's), the run's
error names that strategy and its plugin. A built-in's failure stays asyncbatch's own (a bug to report)."""

from __future__ import annotations

import traceback
from typing import Any

from .errors import ComponentError


def blame(exc: BaseException, strategies: list[tuple[str, str, Any]], host: Any, builtins: Any) -> \
        ComponentError | None:
    """`strategies`: (registry family, name, the built object) of each strategy the run used; `builtins`: the
    names of the plugins that ship with asyncbatch."""
    owners = {id(obj): (family, name) for family, name, obj in strategies}
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        found = owners.get(id(frame.f_locals.get("self")))
        if found is None:
            continue
        family, name = found
        plugin = host.registry(family).get(name).plugin
        if plugin in builtins:
            return None
        return ComponentError(family.replace("_", " "), name, plugin, exc)
    return None
