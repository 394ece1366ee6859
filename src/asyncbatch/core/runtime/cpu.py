"""The `cpu` runtime: every op runs at once, in program order. Reference semantics; runs anywhere."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .base import Access, Event, Runtime, Span


@attrs.frozen
class CpuRuntimeConfig:
    """The `cpu` runtime has no options; ops execute synchronously on the host."""


class CpuRuntime(Runtime):
    """Runs each op immediately on the host thread: streams and events collapse to program order."""

    name = "cpu"
    Config = CpuRuntimeConfig
    graph_support = "none"

    def __init__(self, config: CpuRuntimeConfig | None = None, *, device: str = "cpu") -> None:
        super().__init__()
        import torch

        self._device = torch.device(device)

    @property
    def device(self) -> Any:
        return self._device

    def launch(self, name: str, stream: str, fn: Callable[[], None], *, waits: Sequence[Event | None] = (),
               accesses: Sequence[Access] = (), batch: int = -1, info: dict | None = None) -> Event:
        start = self.now()
        fn()
        end = self.now()
        self.emulation_s += end - start  # the device's work, done here: not host time of the launch
        if self.record_spans:
            self.spans.append(Span(stream, name, start, end, batch))
        event = self._new_event(name, stream)
        event.handle = end - start
        return event

    def op_seconds(self, event: Event | None) -> float | None:
        return event.handle if event is not None else None

    def host_wait(self, event: Event | None, *, reason: str = "") -> None:
        return None
