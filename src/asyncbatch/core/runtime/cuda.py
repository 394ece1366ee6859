"""The `cuda` runtime: real streams, events, pinned host memory and CUDA graphs in one shared pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

from ..errors import UnsupportedError
from .base import Access, Event, GraphHandle, Runtime, Span


@attrs.frozen
class CudaRuntimeConfig:
    """`timing`: record CUDA events around every compute op (busy fraction, per-step device time).
    `trace_copies`: also time the copies (needed for per-stream tracks in a trace).
    `blocking_waits`: the host sleeps in the driver while it waits for an event instead of spinning on a core
    (CUDA's blocking-sync events): frees the core for other work at the cost of a wake-up latency per wait."""

    timing: bool = True
    trace_copies: bool = False
    blocking_waits: bool = False


class _CudaGraph(GraphHandle):
    def __init__(self, graph: Any) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()


class CudaRuntime(Runtime):
    """Ops are enqueued on torch.cuda streams; waits are `stream.wait_event`; the host blocks only in
    `host_wait`. A wait on an event of the same stream is skipped: stream order already implies it."""

    name = "cuda"
    Config = CudaRuntimeConfig
    is_asynchronous = True
    graph_support = "native"

    def __init__(self, config: CudaRuntimeConfig | None = None, *, device: str = "cuda") -> None:
        super().__init__()
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedError("the cuda runtime needs a CUDA device; this machine has none "
                                   "(use runtime: cpu, sim or auto)")
        self.config = config or CudaRuntimeConfig()
        self._device = torch.device(device)
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self.streams: dict[str, Any] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._timings: list[tuple[str, int, Any, Any, dict]] = []
        self._start_of: dict[int, Any] = {}
        self._ref: Any = None

    @property
    def device(self) -> Any:
        return self._device

    def setup_streams(self, names: Sequence[str]) -> None:
        import torch

        super().setup_streams(names)
        # Never the legacy default stream: it would serialise against everything.
        self.streams = {n: torch.cuda.Stream(device=self._device) for n in names}

    def free_memory(self) -> int | None:
        import torch

        return torch.cuda.mem_get_info(self._device)[0]

    def host_buffer(self, numel: int, dtype: Any) -> Any:
        import torch

        return torch.zeros(numel, dtype=dtype, pin_memory=True)

    def launch(self, name: str, stream: str, fn: Callable[[], None], *, waits: Sequence[Event | None] = (),
               accesses: Sequence[Access] = (), batch: int = -1, info: dict | None = None) -> Event:
        import torch

        s = self.streams[stream]
        for e in waits:
            if e is not None and e.stream != stream:
                s.wait_event(e.handle)
        timed = self.config.timing and (name == "comp" or self.config.trace_copies or self.record_spans)
        with torch.cuda.stream(s):
            if timed:
                start = torch.cuda.Event(enable_timing=True)
                start.record(s)
            fn()
            done = torch.cuda.Event(enable_timing=timed, blocking=self.config.blocking_waits)
            done.record(s)
        if timed:
            self._timings.append((name, batch, start, done, {"stream": stream, **(info or {})}))
            self._start_of[id(done)] = start
        event = self._new_event(name, stream)
        event.handle = done
        return event

    def host_wait(self, event: Event | None, *, reason: str = "") -> None:
        if event is not None:
            event.handle.synchronize()

    def capture(self, fn: Callable[[], None], stream: str) -> GraphHandle:
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.streams[stream], capture_error_mode="thread_local"):
            fn()
        return _CudaGraph(graph)

    def graph_pool_bytes(self) -> int:
        """Device memory held by the shared graph pool (all captured graphs together)."""
        import torch

        pool = tuple(self.pool)
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == pool)

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self._device)

    def op_seconds(self, event: Event | None) -> float | None:
        start = self._start_of.get(id(event.handle)) if event is not None else None
        return start.elapsed_time(event.handle) / 1e3 if start is not None else None

    def reset_timeline(self) -> None:
        import torch

        super().reset_timeline()
        self._timings = []
        self._start_of = {}
        self.synchronize()
        self._ref = torch.cuda.Event(enable_timing=True)
        self._ref.record(torch.cuda.current_stream(self._device))
        self._ref.synchronize()

    def device_spans(self) -> list[Span]:
        """Device-side intervals of timed ops, on the host timeline (valid after `synchronize`)."""
        ref = self._ref
        out = []
        for name, batch, start, done, info in self._timings:
            t0 = ref.elapsed_time(start) / 1e3
            t1 = ref.elapsed_time(done) / 1e3
            out.append(Span(info.get("stream", "device"), name, t0, t1, batch, info))
        return out

    def timeline(self) -> list[Span]:
        self.synchronize()
        return sorted([*self.spans, *self.device_spans()], key=lambda s: s.start)

    def compute_busy(self) -> dict[str, float] | None:
        comp = [s for s in self.device_spans() if s.name == "comp"]
        if not comp:
            return None
        busy = sum(s.end - s.start for s in comp)
        span = max(s.end for s in comp) - min(s.start for s in comp)
        return {"busy_s": busy, "span_s": span, "busy_fraction": busy / span if span > 0 else 1.0}

    @contextmanager
    def host_phase(self, name: str, *, batch: int = -1, accesses: Sequence[Access] = (),
                   info: dict | None = None) -> Iterator[None]:
        start = self.now()
        yield
        if self.record_spans:
            self.spans.append(Span("host", name, start, self.now(), batch))
