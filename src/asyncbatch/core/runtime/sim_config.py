"""The `sim` runtime's configuration: how it orders ready ops, and the cost model of its virtual time."""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import attrs

from ..errors import ConfigError
from ..types import seeded_random


class Chooser(Protocol):
    """Picks among n alternatives; hypothesis supplies one backed by `data.draw`."""

    def choose(self, n: int) -> int: ...


class RandomChooser:
    def __init__(self, seed: int) -> None:
        self._rng = seeded_random(seed)  # -s is not s

    def choose(self, n: int) -> int:
        return self._rng.randrange(n)


# An hour per op: beyond it virtual time over a run's steps overflows float64 into inf and NaN latencies.
MAX_OP_MS = 3_600_000.0


def _duration(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= MAX_OP_MS):
        raise ConfigError(attribute.name, f"must be a finite number in [0, {MAX_OP_MS:g}] (milliseconds), got {value}")


def _ms(default: float) -> Any:
    return attrs.field(default=default, validator=_duration)


@attrs.frozen
class CostModel:
    """Per-op durations in milliseconds, for virtual time. `gpu_per_token_ms` adds to compute per batch token."""

    cpu_prep_ms: float = _ms(1.0)
    cpu_update_ms: float = _ms(0.5)
    launch_eager_ms: float = _ms(2.0)
    launch_graph_ms: float = _ms(0.05)
    gpu_compute_ms: float = _ms(10.0)
    gpu_per_token_ms: float = _ms(0.0)
    h2d_ms: float = _ms(0.05)
    d2h_ms: float = _ms(0.02)

    def op_ms(self, name: str, info: dict) -> float:
        if name == "comp":
            return self.gpu_compute_ms + self.gpu_per_token_ms * info.get("tokens", 0)
        return {"h2d": self.h2d_ms, "d2h": self.d2h_ms}.get(name, 0.0)

    def host_ms(self, name: str, info: dict) -> float:
        if name == "prep":
            return self.cpu_prep_ms
        if name == "upd":
            return self.cpu_update_ms
        if name == "launch":
            return self.launch_graph_ms if info.get("graph") else self.launch_eager_ms
        return 0.0


MAX_SCALE = 1e6  # a host phase measured in microseconds stays within MAX_OP_MS


def _positive_finite(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= MAX_SCALE):
        raise ConfigError(attribute.name, f"must be a finite number in (0, {MAX_SCALE:g}], got {value}")


@attrs.frozen
class SimRuntimeConfig:
    """`order`: `random` lets the chooser pick any ready op (exploration); `timed` runs the op that can start
    first in virtual time (a discrete-event simulation). `fifo_streams`: whether a stream orders its ops without
    events (CUDA does; the default checks the stronger contract that the engine declares every edge).
    `host`: `model` charges the fixed `cpu_prep_ms`/`cpu_update_ms` per host phase; `measured` charges the
    host's real time (scheduler included) times `host_scale`, plus the cost model's launch cost."""

    order: Literal["random", "timed"] = "random"
    fifo_streams: bool = False
    check: bool = True
    seed: int = 0
    cost: CostModel = CostModel()
    host: Literal["model", "measured"] = "model"
    host_scale: float = attrs.field(default=1.0, validator=_positive_finite)
