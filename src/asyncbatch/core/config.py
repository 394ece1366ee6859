"""Configuration: frozen attrs values, read from YAML in exactly one place (`load_yaml`).

Every component family is a `ComponentSpec`: a registered name plus that component's own config, structured and
validated at load time. Unknown keys, unknown names and wrong types fail here, naming the dotted key and listing
the valid choices, before any model is built.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import attrs

from .engine_parts import BatchConfig, CacheConfig, ModelConfig, StartupConfig
from .errors import ConfigError
from .structure import structure, unstructure
from .types import SamplingParams, show

__all__ = ["BatchConfig", "CacheConfig", "ComponentSpec", "EngineConfig", "ExperimentConfig", "ModelConfig",
           "OutputConfig", "StartupConfig", "load_yaml", "unstructure"]

# ---------------------------------------------------------------- components


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
            raise ConfigError(key, f"expected a component name or a mapping with 'name', got {show(value)}")
        if host is None:
            from .plugin_host import get_plugin_host  # noqa: PLC0415

            host = get_plugin_host()
        component = host.registry(family).get(name, key if isinstance(value, str) else f"{key}.name")
        return cls(name, component.make_config(params, key))


def _spec_field(family: str, default: str) -> Any:
    return attrs.field(default=default, metadata={"family": family})


# ---------------------------------------------------------------- engine


_ENGINE_FAMILIES = {
    "runtime": "runtime",
    "scheduler": "scheduler",
    "buffers": "buffer_policy",
    "streams": "stream_topology",
    "graphs": "graph_policy",
    "attention": "attention_backend",
}


@attrs.frozen
class EngineConfig:
    """Everything needed to build an `Engine`: the model, the four strategy families, runtime and attention.

    `compile`: `layers` compiles the decoder layers with torch.compile (fuses the small kernels between matrix
    products); `auto` compiles where steps are captured in CUDA graphs (eager launches gain nothing from it);
    `none` never.
    """

    model: ModelConfig = ModelConfig()
    runtime: ComponentSpec = ComponentSpec("auto")
    scheduler: ComponentSpec = ComponentSpec("fifo")
    buffers: ComponentSpec = ComponentSpec("double")
    streams: ComponentSpec = ComponentSpec("three")
    graphs: ComponentSpec = ComponentSpec("mixed")
    attention: ComponentSpec = ComponentSpec("auto")
    cache: CacheConfig = CacheConfig()
    batch: BatchConfig = BatchConfig()
    compile: Literal["auto", "none", "layers"] = "auto"
    startup: StartupConfig = StartupConfig()
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, host: Any = None, key: str = "") -> EngineConfig:
        """Structure and validate an engine mapping (the `engine:` section of an experiment file)."""
        if not isinstance(data, dict):
            raise ConfigError(key or "engine", f"expected a mapping, got {type(data).__name__}")
        data = dict(data)
        known = [f.name for f in attrs.fields(cls)]
        for k in data:
            if k not in known:
                raise ConfigError(f"{key}.{k}" if key else k, "unknown key", known)
        specs: dict[str, ComponentSpec] = {}
        defaults = {f.name: f.default for f in attrs.fields(cls)}
        for field, family in _ENGINE_FAMILIES.items():
            sub = f"{key}.{field}" if key else field
            value = data.pop(field) if field in data else defaults[field].name
            specs[field] = ComponentSpec.resolve(family, value, sub, host)
        base = structure(_EngineScalars, data, key)
        return cls(**attrs.asdict(base, recurse=False), **specs)

    @classmethod
    def from_yaml(cls, path: str | Path, *, host: Any = None) -> EngineConfig:
        """Read an engine file, or the `engine:` section of an experiment file (validating the whole file)."""
        data = load_yaml(path)
        if "engine" in data:
            return ExperimentConfig.from_dict(data, host=host).engine
        return cls.from_dict(data, host=host)

    def to_dict(self) -> dict[str, Any]:
        return unstructure(self)

    def with_defaults_resolved(self, host: Any = None) -> EngineConfig:
        """Fill default component configs (defaults are stored as bare names) from the registry."""
        specs = {}
        for field, family in _ENGINE_FAMILIES.items():
            spec: ComponentSpec = getattr(self, field)
            if spec.config is None:
                specs[field] = ComponentSpec.resolve(family, spec.name, field, host)
        return attrs.evolve(self, **specs)


@attrs.frozen
class _EngineScalars:
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    batch: BatchConfig = BatchConfig()
    compile: Literal["auto", "none", "layers"] = "auto"
    startup: StartupConfig = StartupConfig()
    seed: int = 0


# ---------------------------------------------------------------- experiments


@attrs.frozen
class OutputConfig:
    """Where a run writes results. `trace: true` also writes a Chrome/Perfetto trace of CPU phases and streams."""

    dir: str = "results"
    trace: bool = False
    plots: bool = True
    progress: bool = True


@attrs.frozen
class ExperimentConfig:
    """A YAML experiment: engine, workload, default sampling, and an optional sweep matrix over any keys."""

    name: str = "experiment"
    engine: EngineConfig = EngineConfig()
    workload: ComponentSpec = ComponentSpec("synthetic")
    sampling: SamplingParams = SamplingParams()
    sweep: dict = attrs.Factory(dict)
    output: OutputConfig = OutputConfig()
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, host: Any = None) -> ExperimentConfig:
        if not isinstance(data, dict):
            raise ConfigError("", f"an experiment is a mapping, got {type(data).__name__}")
        data = copy.deepcopy(data)
        known = {f.name for f in attrs.fields(cls)}
        for k in data:
            if k not in known:
                raise ConfigError(k, "unknown key", list(known))
        engine = EngineConfig.from_dict(data.pop("engine", {}), host=host, key="engine")
        workload = ComponentSpec.resolve("workload", data.pop("workload", "synthetic"), "workload", host)
        sampling = structure(SamplingParams, data.pop("sampling", {}), "sampling")
        try:
            sampling.validate()
        except Exception as exc:
            field = str(exc).split(" ", 1)[0]  # RequestError messages start with the field's name
            known_field = field in {f.name for f in attrs.fields(SamplingParams)}
            raise ConfigError(f"sampling.{field}" if known_field else "sampling", str(exc)) from exc
        rest = structure(_ExperimentScalars, data, "")
        exp = cls(engine=engine, workload=workload, sampling=sampling, **attrs.asdict(rest, recurse=False))
        exp.sweep_cells(host=host)  # validate every sweep cell now, before any model is built
        return exp

    @classmethod
    def from_yaml(cls, path: str | Path, *, overrides: list[str] = (), host: Any = None) -> ExperimentConfig:
        data = load_yaml(path)
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, host=host)

    def to_dict(self) -> dict[str, Any]:
        return unstructure(self)

    def sweep_cells(self, host: Any = None) -> list[tuple[dict[str, Any], ExperimentConfig]]:
        """Expand the sweep matrix: one (assignment, config) per cell, each validated; no sweep -> one cell."""
        if not isinstance(self.sweep, dict):
            raise ConfigError("sweep", "expected a mapping of dotted key -> list of values")
        if not self.sweep:
            return [({}, self)]
        base = self.to_dict()
        base.pop("sweep")
        keys = list(self.sweep)
        for k in keys:
            if not isinstance(k, str):
                raise ConfigError("sweep", f"keys are dotted config keys (strings), got {show(k)}")
            values = self.sweep[k]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.{k}", f"expected a non-empty list of values, got {show(values)}")
            _check_path(base, k, host)
        cells: list[tuple[dict[str, Any], ExperimentConfig]] = []
        import itertools

        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            assignment = dict(zip(keys, combo))
            data = copy.deepcopy(base)
            for k, v in assignment.items():
                _set_path(data, k, v)
            try:
                cells.append((assignment, ExperimentConfig.from_dict(data, host=host)))
            except ConfigError as exc:
                cell = "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in assignment.items()) + "}"
                raise ConfigError(f"sweep cell {cell}", str(exc)) from exc
        return cells


@attrs.frozen
class _ExperimentScalars:
    name: str = "experiment"
    sweep: dict = attrs.Factory(dict)
    output: OutputConfig = OutputConfig()
    seed: int = 0


# ---------------------------------------------------------------- YAML and overrides


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The one place asyncbatch reads YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
        except ValueError as exc:  # e.g. an int of more than 4300 digits, which Python refuses to read
            raise ConfigError("", f"{path} holds a value that cannot be read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: `3`, `0.5`, `true`, `[1, 2]`, `double`."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override in place."""
    if "=" not in item:
        raise ConfigError(item, "overrides look like dotted.key=value")
    key, text = item.split("=", 1)
    try:
        value = parse_value(text)
    except ValueError as exc:  # e.g. an int of more than 4300 digits, which Python refuses to read
        raise ConfigError(key.strip(), f"cannot read the value: {exc}") from exc
    _set_path(data, key.strip(), value)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and (i >= 1 or part == "workload"):  # `buffers: double` -> {name: double}
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is {show(child)}, not a mapping; cannot set {dotted}")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _check_path(base: dict[str, Any], dotted: str, host: Any) -> None:
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
