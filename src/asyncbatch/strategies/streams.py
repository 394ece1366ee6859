"""Built-in stream topologies: which stream runs the h2d, compute and d2h roles."""

from __future__ import annotations

import attrs

from ..core.interfaces import StreamTopology


@attrs.frozen
class TopologyConfig:
    """Stream topologies take no parameters."""


class One(StreamTopology):
    """Everything on one stream: copies and compute serialise on the device."""

    Config = TopologyConfig

    def __init__(self, config: TopologyConfig | None = None) -> None:
        pass

    @property
    def streams(self) -> tuple[str, ...]:
        return ("main",)

    def stream_for(self, role: str) -> str:
        return "main"


class Two(StreamTopology):
    """Copies (both directions) on one stream, compute on another."""

    Config = TopologyConfig

    def __init__(self, config: TopologyConfig | None = None) -> None:
        pass

    @property
    def streams(self) -> tuple[str, ...]:
        return ("copy", "compute")

    def stream_for(self, role: str) -> str:
        return "compute" if role == "compute" else "copy"


class Three(StreamTopology):
    """One stream per role: host-to-device copy, compute, device-to-host copy."""

    Config = TopologyConfig

    def __init__(self, config: TopologyConfig | None = None) -> None:
        pass

    @property
    def streams(self) -> tuple[str, ...]:
        return ("h2d", "compute", "d2h")

    def stream_for(self, role: str) -> str:
        return role
