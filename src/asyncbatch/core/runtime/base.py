"""The `Runtime` interface: the engine issues every copy, launch, event and host wait through it.

An op is one unit of device work (a copy, or a whole compute step) placed on a named stream. It may start only
after the events it waits on have completed and after the host issued it. Ops declare the buffers they read and
write so that the `sim` runtime can check, for every pair of conflicting accesses, that some dependency orders
them. Host phases (`prep`, `upd`) are declared the same way.

Runtimes differ in how ops execute: `cpu` runs each at once in program order; `cuda` enqueues on real streams;
`sim` records them and executes them later in any order the declared dependencies allow.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

# A buffer access: (resource, mode, owner). Resource is a hashable name such as ("dev_in", 0) or ("kv", 17);
# mode is "r" or "w"; owner is the request id for per-request resources (KV blocks, rows), else None.
Access = tuple[Any, str, Any]


@attrs.define(eq=False)
class Event:
    """Completion of one op (or of a host phase). Opaque to the engine; runtimes attach their own handle."""

    op_id: int
    name: str
    stream: str
    handle: Any = None


@attrs.define
class Span:
    """One interval on one track of the timeline (host phase or device op), in seconds since the run began."""

    track: str
    name: str
    start: float
    end: float
    batch: int = -1
    args: dict = attrs.Factory(dict)


class GraphHandle(ABC):
    """A captured compute step. `replay()` re-executes it with whatever the static input buffers hold now."""

    @abstractmethod
    def replay(self) -> None: ...


class Runtime(ABC):
    """Streams, events, copies, launches and graph capture for one device.

    Called by the engine's step loop only, on the host thread. Contract:
    - `launch` never blocks the host on device work (except the `cpu` runtime, which has none to overlap).
    - An op starts only after every event in `waits` completed and the host issued it. Whether two ops on one
      stream are ordered without an event is the runtime's business: the engine must never rely on it.
    - `host_wait` returns only when the event's op (and so everything it depends on) has completed.
    - A runtime that does the device's work on the host thread (runs ops, checks them) adds that real time to
      `emulation_s`, so that the step loop's host timings (`host_clock`) count host work only, wherever the
      runtime happens to run an op: in a launch, a wait or a host phase (which depends on the buffer policy).
    """

    name: str = "runtime"
    #: True where ops actually run concurrently with the host (so overlap can exist at all).
    is_asynchronous: bool = False
    #: "native" (CUDA graphs), "emulated" (closures bound at capture: baked scalars and buffers), or "none".
    graph_support: str = "none"
    #: Whether ops should declare their buffer accesses (costly to build; only the checker needs them).
    tracks_accesses: bool = False
    #: Real seconds the host thread has spent doing the device's work (see the contract above).
    emulation_s: float = 0.0

    def __init__(self) -> None:
        self._next_id = 0
        self.spans: list[Span] = []
        self.record_spans = False
        self._t0 = time.perf_counter()
        self.emulation_s = 0.0  # only ever grows: the step loop reads differences (`host_clock`)

    # ---- setup
    @property
    @abstractmethod
    def device(self) -> Any:
        """The torch device buffers and model live on."""

    def setup_streams(self, names: Sequence[str]) -> None:
        """Create the named streams (called once, by the engine, from the stream topology)."""
        self.stream_names = tuple(names)

    def host_buffer(self, numel: int, dtype: Any) -> Any:
        """A host staging buffer (pinned where the runtime copies asynchronously)."""
        import torch

        return torch.zeros(numel, dtype=dtype)

    def free_memory(self) -> int | None:
        """Bytes free for new buffers on `device` (the engine sizes and checks the KV cache with it); None where it
        cannot be told. Host memory here (Linux `MemAvailable`)."""
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def device_buffer(self, numel: int, dtype: Any) -> Any:
        import torch

        return torch.zeros(numel, dtype=dtype, device=self.device)

    # ---- work
    def _new_event(self, name: str, stream: str) -> Event:
        self._next_id += 1
        return Event(self._next_id, name, stream)

    @abstractmethod
    def launch(
        self,
        name: str,
        stream: str,
        fn: Callable[[], None],
        *,
        waits: Sequence[Event | None] = (),
        accesses: Sequence[Access] = (),
        batch: int = -1,
        info: dict | None = None,
    ) -> Event:
        """Issue `fn` as one op on `stream` after `waits`; return its completion event.

        `info` describes the op for cost models and traces (e.g. ``{"tokens": 32, "graph": True}``).
        """

    @abstractmethod
    def host_wait(self, event: Event | None, *, reason: str = "") -> None:
        """Block the host until `event` completed (None: nothing to wait for)."""

    @contextmanager
    def host_phase(self, name: str, *, batch: int = -1, accesses: Sequence[Access] = (),
                   info: dict | None = None) -> Iterator[None]:
        """Bracket host work that touches shared buffers (prep writes host inputs, upd reads host outputs)."""
        start = self.now()
        yield
        if self.record_spans:
            self.spans.append(Span("host", name, start, self.now(), batch))

    def capture(self, fn: Callable[[], None], stream: str) -> GraphHandle | None:
        """Capture `fn` as a graph on `stream` (None where the runtime has no graphs)."""
        return None

    def op_seconds(self, event: Event | None) -> float | None:
        """Device time of a completed op, where the runtime measures it (compute ops at least)."""
        return None

    def synchronize(self) -> None:
        """Wait for all issued work (end of a run)."""

    def compute_busy(self) -> dict[str, float] | None:
        """Device busy time of the compute stream over the last run, if the runtime can measure it."""
        return None

    def timeline(self) -> list[Span]:
        """Every recorded interval of the last run (host phases and device ops), in seconds since it began.
        Set `record_spans = True` before the run; device ops are included where the runtime can time them."""
        return sorted(self.spans, key=lambda s: s.start)

    def idle_until(self, t: float) -> None:
        """Nothing to run until time `t` (seconds since the run began): the next online arrival."""
        delay = t - self.now()
        if delay > 0:
            time.sleep(min(delay, 0.05))

    def reset_timeline(self) -> None:
        self.spans = []
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def host_clock(self) -> float:
        """Real seconds, less those the host thread spent doing the device's work (`emulation_s`): a difference
        of two readings is host work only. On `cuda` it is the real clock."""
        return time.perf_counter() - self.emulation_s


class ImmediateGraph(GraphHandle):
    """Emulated graph: the capture-time closure (buffers and Python scalars bound then) replayed as is."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn

    def replay(self) -> None:
        self._fn()
