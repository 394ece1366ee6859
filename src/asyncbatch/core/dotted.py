"""Dotted config keys: `--set` overrides and the axes of a sweep, on plain (YAML-shaped) mappings.

Pure dict manipulation, before anything is structured: `config.ExperimentConfig` applies these, then validates;
`refuse_repeated_cells` then compares the sweep's cells as resolved (plain dicts again).
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ConfigError
from .types import show

_LOADER: Any = None
#: A sweep's axes: per axis its keys (one, or a `zip` group's) and its points (one value per key).
Axes = list[tuple[tuple[str, ...], list[tuple[Any, ...]]]]


def yaml_loader() -> Any:
    """PyYAML's safe loader, reading numbers as YAML 1.2 and JSON do: `1e-3` and `5E+2` are numbers (YAML 1.1 wants
    a dot in the mantissa and reads the rest as strings, which then fail as "expected a number, got str"); `010` is
    ten, not YAML 1.1's octal eight, and `1:30` is text, not its base-60 ninety (either would silently run another
    experiment). A key given twice in one mapping is an error (`DuplicateKey`), not the last one silently kept."""
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class DuplicateKeyError(yaml.constructor.ConstructorError):
            pass

        class Loader(yaml.SafeLoader):
            DuplicateKey = DuplicateKeyError

            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                # PyYAML keeps the last of two equal keys: a second `engine:` section (or `buffers:` line)
                # would silently drop the first. Merge keys (`<<: *base`) may still be overridden.
                if isinstance(node, yaml.MappingNode):
                    seen: dict[Any, Any] = {}
                    for key_node, _ in node.value:
                        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key = (key_node.tag, key_node.value)
                        if key in seen:
                            exc = DuplicateKeyError(f"found the key {key_node.value!r} here", seen[key],
                                                    "and again here (a key given twice in one mapping would "
                                                    "silently replace the first)", key_node.start_mark)
                            exc.key = key_node.value
                            raise exc
                        seen[key] = key_node.start_mark
                return super().construct_mapping(node, deep=deep)

            def construct_yaml_int(self, node: Any) -> Any:
                text = self.construct_scalar(node)
                digits = text.replace("_", "").lstrip("+-")
                if ":" in text:  # base 60
                    return text
                if len(digits) > 1 and digits[0] == "0" and digits.isdigit():  # a leading zero, not octal
                    return int(text.replace("_", ""), 10)
                return super().construct_yaml_int(node)

            def construct_yaml_float(self, node: Any) -> Any:
                text = self.construct_scalar(node)
                return text if ":" in text else super().construct_yaml_float(node)  # base 60 (`1:30.5`)

        Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
        Loader.add_constructor("tag:yaml.org,2002:float", Loader.construct_yaml_float)
        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))
        _LOADER = Loader
    return _LOADER


def parse_value(text: str, key: str = "") -> Any:
    """`--set` values are YAML scalars/lists: `3`, `0.5`, `1e-3`, `true`, `[1, 2]`, `double`. Text that is not YAML
    stays text; a value that cannot be read at all (a key given twice in a mapping, an int Python refuses) is a
    `ConfigError` naming `key` (the dotted key, or the flag, that the value was given for)."""
    import yaml

    loader = yaml_loader()
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506  (a safe loader)
    except loader.DuplicateKey as exc:
        raise ConfigError(key, f"cannot read the value {text!r}: it gives the key {exc.key!r} twice (the second "
                               "would silently replace the first)") from None
    except yaml.YAMLError:
        return text
    except ValueError as exc:  # e.g. an int of more than 4300 digits, which Python refuses to read
        raise ConfigError(key, f"cannot read the value: {exc}") from None


def apply_override(data: dict[str, Any], item: str, defaults: dict[str, Any] | None = None) -> None:
    """Apply one `dotted.key=value` override in place. A section missing from `data` starts as its counterpart in
    `defaults` (so `--set workload.num_requests=8` works on a file without a `workload:` section)."""
    if "=" not in item:
        raise ConfigError(item, "overrides look like dotted.key=value")
    key, text = item.split("=", 1)
    if not all(part.strip() for part in key.split(".")):  # `=3`, `engine..seed=3`: not "unknown key ''"
        raise ConfigError(item, "overrides look like dotted.key=value: the key or one of its dotted parts is empty")
    set_path(data, key.strip(), parse_value(text, key.strip()), defaults)


def set_path(data: dict[str, Any], dotted: str, value: Any, defaults: dict[str, Any] | None = None) -> None:
    parts = dotted.split(".")
    if parts[0] == "sweep" and len(parts) > 2:
        # A sweep's keys are dotted keys themselves: `--set sweep.engine.buffers=[single]` sets the axis
        # `engine.buffers` (in `sweep.zip.KEY`, a zip group's), not a mapping `engine: {buffers: ...}`.
        head = 2 if parts[1] == "zip" else 1
        parts = parts[:head] + [".".join(parts[head:])]
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


def sweep_axes(sweep: Any) -> Axes:
    """The axes of the sweep product, in mapping order: (keys, points); a plain key's points are 1-tuples."""
    if not isinstance(sweep, dict):
        raise ConfigError("sweep", f"expected a mapping of dotted key -> list of values, got {show(sweep)}")
    axes: Axes = []
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


REPEATED_WHY = ("the two cells would be the same run, seeds included, and would pass for replicates with a spread "
                "that is not there; list each value once, and for replicates set `repeat: N` (repetition i adds i "
                "to the seeds)")


def refuse_repeated_cells(axes: Axes, combos: list[tuple[int, ...]], resolved: list[dict[str, Any]]) -> None:
    """Refuse two sweep cells whose resolved configs are equal; `combos[n]` holds cell n's point index per axis.

    Resolved, so that values written differently but read alike count: `1` and `1.0` for a float, `single` and
    `{name: single}` for a component, two equal mappings."""
    first: dict[Any, int] = {}
    for n, data in enumerate(resolved):
        m = first.setdefault(_frozen(data), n)
        if m != n:
            raise _repeated(axes, combos[m], combos[n])


def _repeated(axes: Axes, a: tuple[int, ...], b: tuple[int, ...]) -> ConfigError:
    differ = [(keys, points, i, j) for (keys, points), i, j in zip(axes, a, b, strict=True) if i != j]
    if len(differ) != 1:  # keys that set one field twice (`engine.batch` and `engine.batch.max_seqs`)
        cells = [{k: v for (keys, points), i in zip(axes, c) for k, v in zip(keys, points[i])} for c in (a, b)]
        return ConfigError("sweep", f"cells {show(cells[0])} and {show(cells[1])}: {REPEATED_WHY}")
    ((keys, points, i, j),) = differ
    if len(keys) == 1:
        where, x, y = f"sweep.{keys[0]}", points[i][0], points[j][0]
    else:
        where, x, y = "sweep.zip", dict(zip(keys, points[i])), dict(zip(keys, points[j]))
    what = f"lists {show(x)} twice" if show(x) == show(y) else f"{show(x)} and {show(y)} are read as one value"
    return ConfigError(where, f"{what} (positions {i + 1} and {j + 1}): {REPEATED_WHY}")


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a resolved (YAML-shaped) config value, equal where the values are equal."""
    if isinstance(value, dict):
        return frozenset((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, bool):  # True == 1 to Python, not to a config: a flag is not a count
        return (bool, value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


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
