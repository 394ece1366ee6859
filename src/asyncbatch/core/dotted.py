"""Dotted config keys: `--set` overrides and the axes of a sweep, on plain (YAML-shaped) mappings.

Pure dict manipulation, before anything is structured: `config.ExperimentConfig` applies these, then validates.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ConfigError
from .types import show

_LOADER: Any = None


def yaml_loader() -> Any:
    """PyYAML's safe loader, reading `1e-3` and `5E+2` as numbers, as YAML 1.2 and JSON do: YAML 1.1 wants a dot in
    the mantissa (`1.0e-3`) and reads the rest as strings, which then fail as "expected a number, got str"."""
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))
        _LOADER = Loader
    return _LOADER


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: `3`, `0.5`, `1e-3`, `true`, `[1, 2]`, `double`."""
    import yaml

    try:
        return yaml.load(text, Loader=yaml_loader())  # noqa: S506  (a safe loader)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], item: str, defaults: dict[str, Any] | None = None) -> None:
    """Apply one `dotted.key=value` override in place. A section missing from `data` starts as its counterpart in
    `defaults` (so `--set workload.num_requests=8` works on a file without a `workload:` section)."""
    if "=" not in item:
        raise ConfigError(item, "overrides look like dotted.key=value")
    key, text = item.split("=", 1)
    try:
        value = parse_value(text)
    except ValueError as exc:  # e.g. an int of more than 4300 digits, which Python refuses to read
        raise ConfigError(key.strip(), f"cannot read the value: {exc}") from exc
    set_path(data, key.strip(), value, defaults)


def set_path(data: dict[str, Any], dotted: str, value: Any, defaults: dict[str, Any] | None = None) -> None:
    parts = dotted.split(".")
    node, default = data, defaults
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        default = default.get(part) if isinstance(default, dict) else None
        if isinstance(child, str) and (i >= 1 or part == "workload"):  # `buffers: double` -> {name: double}
            child = {"name": child}
        if child is None:
            child = copy.deepcopy(default) if isinstance(default, dict) else {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is {show(child)}, not a mapping; cannot set {dotted}")
        node[part] = child
        node = child
    node[parts[-1]] = value


def sweep_axes(sweep: Any) -> list[tuple[tuple[str, ...], list[tuple[Any, ...]]]]:
    """The axes of the sweep product, in mapping order: (keys, points); a plain key's points are 1-tuples."""
    if not isinstance(sweep, dict):
        raise ConfigError("sweep", f"expected a mapping of dotted key -> list of values, got {show(sweep)}")
    axes: list[tuple[tuple[str, ...], list[tuple[Any, ...]]]] = []
    for key, values in sweep.items():
        if key == "zip":
            if not isinstance(values, dict) or not values:
                raise ConfigError("sweep.zip", "expected a mapping of dotted key -> list of values (varied "
                                               f"together), got {show(values)}")
            for k, v in values.items():
                _check_sweep_values(k, v, "sweep.zip")
            lengths = {k: len(v) for k, v in values.items()}
            if len(set(lengths.values())) > 1:
                raise ConfigError("sweep.zip", "lists must have equal lengths: "
                                               + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
            axes.append((tuple(values), list(zip(*values.values()))))
        else:
            _check_sweep_values(key, values, "sweep")
            axes.append(((key,), [(v,) for v in values]))
    seen: set[str] = set()
    for keys, _ in axes:
        for k in keys:
            if k in seen:
                raise ConfigError(f"sweep.{k}", "is both in sweep.zip and outside it: a key varies in one place")
            seen.add(k)
    return axes


def _check_sweep_values(key: Any, values: Any, where: str) -> None:
    if not isinstance(key, str):
        raise ConfigError(where, f"keys are dotted config keys (strings), got {show(key)}")
    if key.split(".")[0] in ("sweep", "repeat"):
        raise ConfigError(f"{where}.{key}", "cannot be swept: `repeat` runs every cell, `sweep` defines them")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{key}", f"expected a non-empty list of values, got {show(values)}")


def check_path(base: dict[str, Any], dotted: str, host: Any) -> None:
    """A sweep key must name an existing config field (component params are checked per cell)."""
    parts = dotted.split(".")
    probe = copy.deepcopy(base)
    node: Any = probe
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        if isinstance(node, dict) and i == len(parts) - 1 and parts[i - 1] == "overrides":
            break  # model.overrides is free-form: the model config validates it
        raise ConfigError(f"sweep.{dotted}", f"no such key {'.'.join(parts[: i + 1])!r}",
                          list(node) if isinstance(node, dict) else None)
