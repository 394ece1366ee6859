"""What the simulation study runs: per-step costs, horizon, workload and the three pipeline axes, from a YAML
`simulate:` mapping and command-line flags (flags win), validated before any model is built.

Axis entries are registered component names (built-in or from a plugin), validated against the plugin host's
registries: `name`, a mapping `{name: ..., **params}`, or on the command line `name:key=value[:key=value]` in a
comma list (or a YAML flow list `[...]` where values hold commas). `slots: [1, 2, 3]` is shorthand for the
buffer policies `single`, `double`, `n_slot(3)`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ..core.config import ComponentSpec, load_yaml, parse_value, unstructure
from ..core.errors import ConfigError
from ..core.structure import structure
from ..core.types import show

PREP_SHARE = 0.75
# Long enough that fill and drain (one step's latency less one period, ~8.8 ms at the default costs) cost under
# 0.5% of the whole run's busy fraction (0.33% at 96 x 28 ms), short enough for the default grid in ~15 s on 2 cores.
DEFAULT_STEPS = 96
MAX_LEN = 2048  # the tiny model's context: prompt plus generated tokens must fit
# The study runs the tiny model on the CPU over every request, in every step of every combination (time grows
# linearly: about 1 s per 100 requests on the default grid), while the cost model charges per step, so more
# requests measure nothing new: beyond this many the study would only run for hours.
MAX_REQUESTS = 1024
DEFAULT_SLOTS = (1, 2, 3)
DEFAULT_STREAMS = ("one", "two", "three")
DEFAULT_GRAPHS = ("eager", "per_slot")
KEYS = ("costs", "steps", "workload", "slots", "buffers", "streams", "graphs", "scheduler")
AXES = {"buffers": "buffer_policy", "streams": "stream_topology", "graphs": "graph_policy"}
# Each flag overrides one key of the `simulate:` mapping; errors in a value that came from a flag name the flag.
FLAG_KEYS = {
    "--gpu-ms": "costs.gpu_ms", "--cpu-ms": "costs.cpu_ms", "--launch-eager-ms": "costs.launch_eager_ms",
    "--launch-graph-ms": "costs.launch_graph_ms", "--h2d-ms": "costs.h2d_ms", "--d2h-ms": "costs.d2h_ms",
    "--steps": "steps", "--requests": "workload.requests", "--prompt-len": "workload.prompt_len",
    "--slots": "slots", "--buffers": "buffers", "--streams": "streams", "--graphs": "graphs",
    "--scheduler": "scheduler",
}


def _finite(*, above: bool) -> Any:
    """>= 0, or > 0 where `above`; NaN and infinities never pass."""
    def check(_: Any, attribute: attrs.Attribute, value: float) -> None:
        if not (math.isfinite(value) and (value > 0 if above else value >= 0)):
            raise ConfigError(attribute.name, f"must be a finite number {'>' if above else '>='} 0, got {value}")
    return check


def _at_least(low: int) -> Any:
    def check(_: Any, attribute: attrs.Attribute, value: int) -> None:
        if value < low:
            raise ConfigError(attribute.name, f"must be >= {low}, got {value}")
    return check


@attrs.frozen
class StudyCosts:
    """Per-step costs in milliseconds (defaults: the published shape, about 24% GPU idle when synchronous).

    `cpu_ms` is the host work of a step besides launching; 75% is charged to `prep`, 25% to `upd` (roughly the
    split measured on a CPU run; it moves where the host waits, not how busy the GPU is)."""

    gpu_ms: float = attrs.field(default=28.0, validator=_finite(above=True))
    cpu_ms: float = attrs.field(default=8.3, validator=_finite(above=False))
    launch_eager_ms: float = attrs.field(default=0.5, validator=_finite(above=False))
    launch_graph_ms: float = attrs.field(default=0.05, validator=_finite(above=False))
    h2d_ms: float = attrs.field(default=0.05, validator=_finite(above=False))
    d2h_ms: float = attrs.field(default=0.02, validator=_finite(above=False))

    def cost_model(self) -> dict[str, float]:
        return {"cpu_prep_ms": self.cpu_ms * PREP_SHARE, "cpu_update_ms": self.cpu_ms * (1 - PREP_SHARE),
                "launch_eager_ms": self.launch_eager_ms, "launch_graph_ms": self.launch_graph_ms,
                "gpu_compute_ms": self.gpu_ms, "gpu_per_token_ms": 0.0, "h2d_ms": self.h2d_ms, "d2h_ms": self.d2h_ms}


@attrs.frozen
class StudyWorkload:
    """`requests` prompts of `prompt_len` tokens, all in one batch; each generates `steps` tokens (the horizon):
    one prefill step, then `steps - 1` decode steps."""

    requests: int = attrs.field(default=8, validator=_at_least(1))
    prompt_len: int = attrs.field(default=4, validator=_at_least(1))

    def __attrs_post_init__(self) -> None:
        if self.requests > MAX_REQUESTS:
            raise ConfigError("requests", f"must be at most {MAX_REQUESTS}, got {self.requests}: the study runs "
                                          "the tiny model on the CPU over every request of every step and "
                                          "combination, and its costs are per step, so more requests only take "
                                          "longer (all of them share one batch)")


@attrs.frozen
class Choice:
    """One entry of an axis: the row label (presentation only: not compared) and the validated component."""

    label: str = attrs.field(eq=False)
    spec: ComponentSpec


def _label(value: Any, spec: ComponentSpec) -> str:
    """The name, with the parameters the entry gave (not every default): `n_slot(3)`, `per_slot`."""
    if isinstance(value, dict):
        params = {k: v for k, v in value.items() if k != "name"}
    elif isinstance(value, ComponentSpec) and value.config is not None:
        params = unstructure(value.config)
    else:
        params = {}
    if not params:
        return spec.name
    if len(params) == 1:
        return f"{spec.name}({next(iter(params.values()))})"
    return f"{spec.name}(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"


def _nonempty(_: Any, attribute: attrs.Attribute, value: tuple) -> None:
    if not value:
        hint = "give slots or buffers" if attribute.name == "buffers" else "give at least one entry"
        raise ConfigError(attribute.name, f"the {attribute.name} axis is empty: {hint}")


@attrs.frozen(kw_only=True)
class StudyConfig:
    """A validated study: every buffers x streams x graphs combination runs `steps` steps under `scheduler`.
    The axes are checked against a plugin host's registries, so build one with `load_study` (the defaults) or
    `from_dict`."""

    costs: StudyCosts = StudyCosts()
    steps: int = attrs.field(default=DEFAULT_STEPS, validator=_at_least(2))
    workload: StudyWorkload = StudyWorkload()
    buffers: tuple[Choice, ...] = attrs.field(validator=_nonempty)
    streams: tuple[Choice, ...] = attrs.field(validator=_nonempty)
    graphs: tuple[Choice, ...] = attrs.field(validator=_nonempty)
    scheduler: ComponentSpec = ComponentSpec("fifo")

    def __attrs_post_init__(self) -> None:
        if self.steps + self.workload.prompt_len > MAX_LEN:
            raise ConfigError("steps", f"prompt_len + steps must fit the tiny model's {MAX_LEN}-token context, got "
                                       f"{self.workload.prompt_len} + {self.steps}")

    @classmethod
    def from_dict(cls, data: Any, *, host: Any = None, key: str = "simulate") -> StudyConfig:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(key, f"expected a mapping with keys {', '.join(KEYS)}, got {show(data)}")
        for k in data:
            if k not in KEYS:
                raise ConfigError(f"{key}.{k}", "unknown key", list(KEYS))
        base = structure(_Scalars, {k: data[k] for k in ("costs", "steps", "workload", "slots") if k in data}, key)
        slots = base.slots if base.slots is not None or "buffers" in data else DEFAULT_SLOTS
        buffers = [_slot_choice(n, f"{key}.slots[{i}]", host) for i, n in enumerate(slots or ())]
        buffers += _axis(data.get("buffers", []), "buffers", key, host)
        axes = {"buffers": buffers,
                "streams": _axis(data.get("streams", list(DEFAULT_STREAMS)), "streams", key, host),
                "graphs": _axis(data.get("graphs", list(DEFAULT_GRAPHS)), "graphs", key, host)}
        for name, choices in axes.items():
            specs = [c.spec for c in choices]
            for i, choice in enumerate(choices):
                if choice.spec in specs[:i]:
                    raise ConfigError(f"{key}.{name}", f"{choice.label!r} is listed twice"
                                      + (" (with slots)" if name == "buffers" else ""))
        scheduler = ComponentSpec.resolve("scheduler", data.get("scheduler", "fifo"), f"{key}.scheduler", host)
        try:
            return cls(costs=base.costs, steps=base.steps, workload=base.workload, scheduler=scheduler,
                       **{name: tuple(choices) for name, choices in axes.items()})
        except ConfigError as exc:
            raise ConfigError(f"{key}.{exc.key}", exc.message, exc.valid) from None

    def to_dict(self) -> dict[str, Any]:
        """The `simulate:` mapping that loads back to an equal study (slots and defaults spelled out)."""
        return {"costs": unstructure(self.costs), "steps": self.steps, "workload": unstructure(self.workload),
                **{name: [unstructure(c.spec) for c in getattr(self, name)] for name in AXES},
                "scheduler": unstructure(self.scheduler)}


@attrs.frozen
class _Scalars:
    costs: StudyCosts = StudyCosts()
    steps: int = DEFAULT_STEPS
    workload: StudyWorkload = StudyWorkload()
    slots: tuple[int, ...] | None = None


def _slot_choice(n: int, key: str, host: Any) -> Choice:
    if n < 1:
        raise ConfigError(key, f"a slot count is >= 1, got {n}")
    value: Any = {1: "single", 2: "double"}.get(n) or {"name": "n_slot", "num_slots": n}
    return Choice(_label(value, spec := ComponentSpec.resolve("buffer_policy", value, key, host)), spec)


def _axis(value: Any, name: str, key: str, host: Any) -> list[Choice]:
    items = value if isinstance(value, list) else [value]  # one name or mapping is a one-entry axis
    specs = [ComponentSpec.resolve(AXES[name], v, f"{key}.{name}[{i}]", host) for i, v in enumerate(items)]
    return [Choice(_label(v, s), s) for v, s in zip(items, specs, strict=True)]


# ---------------------------------------------------------------- command-line values


def _parse_entry(text: str, flag: str) -> Any:
    """`name` or `name:key=value[:key=value]` -> a name or a component mapping (values read as YAML)."""
    name, *params = text.strip().split(":")
    if not name.strip():
        raise ConfigError(flag, f"empty entry in {text!r}: entries look like name or name:key=value")
    out: dict[str, Any] = {}
    for p in params:
        if "=" not in p:
            raise ConfigError(flag, f"parameters look like name:key=value, got {text!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = parse_value(v.strip(), flag)
    return {"name": name.strip(), **out} if out else name.strip()


def parse_axis(text: str, flag: str) -> list[Any]:
    """A comma list of entries, or a YAML flow list (`[single, {name: n_slot, num_slots: 4}]`)."""
    if text.lstrip().startswith("["):
        value = parse_value(text, flag)
        if not isinstance(value, list):
            raise ConfigError(flag, f"not a YAML list: {text!r}")
        return value
    return [_parse_entry(t, flag) for t in text.split(",")]


def parse_slots(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(flag, f"expected slot counts as a comma list of ints (e.g. 1,2,3,8), got {text!r}") from None


def _parse_flag(flag: str, value: Any) -> Any:
    if flag == "--slots":
        return parse_slots(value, flag)
    if flag in ("--buffers", "--streams", "--graphs"):
        return parse_axis(value, flag)
    if flag == "--scheduler":
        return parse_value(value, flag) if value.lstrip().startswith("{") else _parse_entry(value, flag)
    return value


def load_study(path: str | Path | None = None, flags: Mapping[str, Any] | None = None, *,
               host: Any = None) -> StudyConfig:
    """The study from a file's `simulate:` mapping (or the defaults), with `flags` ({'--gpu-ms': 30, ...})
    replacing the keys they name."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = load_yaml(path)
        for k in raw:
            if k != "simulate":
                raise ConfigError(k, f"unknown key in {path}: a simulate file holds one `simulate:` mapping",
                                  ["simulate"])
        if "simulate" not in raw:
            raise ConfigError("simulate", f"missing in {path}: a simulate file holds one `simulate:` mapping")
        data = raw["simulate"] if raw["simulate"] is not None else {}
        if not isinstance(data, dict):
            raise ConfigError("simulate", f"expected a mapping with keys {', '.join(KEYS)}, got {show(data)}")
        data = copy.deepcopy(data)
    blame: dict[str, str] = {}
    for flag, value in (flags or {}).items():
        dotted = FLAG_KEYS[flag]
        _set(data, dotted, _parse_flag(flag, value))
        blame[dotted] = flag
    try:
        return StudyConfig.from_dict(data, host=host)
    except ConfigError as exc:
        raise _blame_flag(exc, blame) from None


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            return  # the file's own value is wrong: its error (naming the file's key) comes from validation
        node = node[p]
    node[last] = value


def _blame_flag(exc: ConfigError, blame: Mapping[str, str]) -> ConfigError:
    """Re-key an error about a value that came from a flag: `simulate.costs.gpu_ms` -> `--gpu-ms`."""
    rest = exc.key.removeprefix("simulate.")
    for dotted, flag in blame.items():
        if rest == dotted or rest.startswith((dotted + ".", dotted + "[")):
            return ConfigError(flag + rest[len(dotted):], exc.message, exc.valid)
    return exc

