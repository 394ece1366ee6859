"""What the HTTP app needs of a live engine (`LiveEngine`), and what a serving engine reports (`ServeObserver`).

Two live engines implement it: `AsyncEngine`, whose step loop is a thread of the app's own process, and
`RemoteEngine`, the app's end of a step loop that runs in another process (`engine.serve.front_end`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import RequestError
from ..core.requests import Status
from ..core.types import SamplingParams
from .errors import EngineClosedError, EngineDeadError, QueueFullError
from .stream import RequestStream

log = logging.getLogger("asyncbatch")

if TYPE_CHECKING:
    from ..core.intake import Intake
    from ..core.requests import RequestState
    from ..core.stats import StepStats
    from ..core.types import Output
    from .protocol import ServedModel


CPU_EVERY = 32  # a serving step loop reads its CPU clocks (and sends a full message, under `front_end: process`)
# once every this many steps, and when it goes idle

class ServeObserver:
    """Receives what a serving engine measures (the metrics of `asyncbatch serve` subclass it); the defaults do
    nothing. With `AsyncEngine`, `step` is called on the step loop's thread, once per step, so it must be quick and
    thread-safe; with `RemoteEngine` it comes on the event loop's thread, in order but in batches: the engine sends
    the stats of up to 32 steps at once, with a step that ends a request, and when it goes idle. The
    per-request calls (`first_token`, `token_gap`, `finished`) and `rejected` always come on the event loop's
    thread, in the order the step loop saw them: per token, the step loop only takes the time (host clock) and
    hands it over, so that serving adds as little as possible to the host work of a step."""

    def step(self, stats: StepStats) -> None:
        """One step was read back (host phase times, tokens, device compute time where measured)."""

    def first_token(self, seconds: float) -> None:
        """A request's first token, `seconds` after it was submitted (host clock)."""

    def token_gap(self, seconds: float) -> None:
        """Host-clock time between two consecutive tokens of one request."""

    def finished(self, output: Output, seconds: float) -> None:
        """A request ended, `seconds` after it was submitted."""

    def rejected(self, reason: str) -> None:
        """`add_request` refused a request: `queue_full`, `invalid` or `closed` (event loop thread)."""


class LiveEngine(ABC):
    """An engine that takes requests while it runs, seen from asyncio code (the HTTP app).

    The app's lifespan calls `start` once and `shutdown` once, on the event loop that reads the streams; handlers
    call `add_request` (shared: it validates with `intake`, then `_submit`s) and `abort` on that loop; `stats` is
    read by metric scrapes and by `add_request` for the queue bound. Nothing here may block the event
    loop on the device: a step that is slow delays tokens, never the loop.
    """

    @abstractmethod
    async def start(self) -> None:
        """Return once the step loop serves (after any warm-up); raise `EngineDeadError` if it cannot start."""

    @abstractmethod
    async def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for up to `timeout` seconds (default
        `engine.serve.shutdown_timeout_s`), cancel the rest, stop the step loop. Completed responses stay readable."""

    def add_request(self, prompt: Sequence[int] | str, params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> RequestStream:
        """Submit one request (from the event loop's thread) and return its stream at once.

        Raises, and submits nothing: `RequestError` naming what is wrong (a token outside the vocabulary, a prompt
        that leaves no room to generate, a text prompt without a tokenizer, a bad sampling value); `QueueFullError`
        when `max_waiting` requests already wait for a row; `EngineClosedError` before `start` or once shutting down;
        `EngineDeadError` if the step loop died; `ValueError` if `request_id` is used by a request still running.
        """
        if self._failure is not None:
            raise EngineDeadError(f"the engine stopped serving: {self._failure}")
        if not self._accepting:
            self._rejected("closed")
            raise EngineClosedError("the engine is not taking requests (not started, or shutting down)")
        waiting = self.stats()["waiting"]
        if waiting >= self.max_waiting:
            self._rejected("queue_full")
            raise QueueFullError(f"{waiting} requests already wait for a row (engine.serve.max_waiting="
                                 f"{self.max_waiting}); retry later")
        rid = f"req-{next(self._ids)}" if request_id is None else request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already used by a request that has not ended")
        try:
            (request,) = self.intake.make_requests([prompt], params or SamplingParams(), request_ids=[rid],
                                                   arrival_times=None)
        except TypeError as exc:  # a text prompt without a tokenizer, or not a prompt at all
            self._rejected("invalid")
            raise RequestError(str(exc)) from None
        state = self.intake.state(request, 0)
        if state.status is Status.FINISHED:
            self._rejected("invalid")
            raise RequestError(state.error or "invalid request")
        stream = RequestStream(rid, request.prompt_ids, time.perf_counter(), self.abort)
        self._streams[rid] = stream
        self._all_ended.clear()  # type: ignore[union-attr]
        self._submit(state)
        return stream

    @abstractmethod
    def _submit(self, state: RequestState) -> None:
        """Hand a request `add_request` accepted (its stream is registered) to the step loop."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Cancel a request: it ends with finish reason `cancelled`, its KV blocks and row freed. False if unknown."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: `waiting`, `running`, `kv_blocks_used`, `kv_blocks_total`, and CPU seconds:
        `step_loop_cpu_s` (the step loop's thread since serving began), `engine_cpu_s` (the engine's whole
        process) and `front_end_cpu_s` (the HTTP process, or None when it is the engine's); `handover_s`, the step
        loop's time spent sending steps to a front-end process (None without one)."""

    # Shared state, set by each subclass's __init__ and start.
    served: ServedModel  # the served model as request parsing sees it (name, tokenizer, context, vocabulary)
    observers: list[ServeObserver]
    intake: Intake  # validates and seeds requests as the engine does
    max_waiting: int
    _streams: dict[str, RequestStream]  # requests not ended yet, by id (the event loop's)
    _all_ended: asyncio.Event | None = None  # set while `_streams` is empty (made by `start`)
    _ids: itertools.count
    _started: bool = False
    _accepting: bool = False
    _failure: BaseException | None = None

    @property
    def accepting(self) -> bool:
        """Started, not shutting down, and the step loop alive."""
        return self._accepting and self._failure is None

    async def drain(self, timeout: float | None = None) -> None:
        """Shutdown's first half, on its own: refuse new requests, let those in flight finish for up to `timeout`
        seconds (default `engine.serve.shutdown_timeout_s`), then cancel the rest, so that every stream ends with
        its last event. The server calls it as soon as it is told to stop, before it waits for its connections to
        close; `shutdown` does it too (then at once: nothing is left). Idempotent."""
        self._accepting = False
        if self._all_ended is not None:
            await self._finish_or_cancel(self._shutdown_timeout() if timeout is None else timeout)

    @abstractmethod
    def _shutdown_timeout(self) -> float:
        """`engine.serve.shutdown_timeout_s` of the engine behind this one."""

    async def _finish_or_cancel(self, timeout: float) -> None:
        """Shutdown's first half: wait up to `timeout` seconds for every open request to end, then cancel the rest."""
        assert self._all_ended is not None
        try:
            await asyncio.wait_for(self._all_ended.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: cancelling %d requests still running after %.3g s", len(self._streams), timeout)
            for rid in list(self._streams):
                self.abort(rid)

    def _rejected(self, reason: str) -> None:
        for o in self.observers:
            o.rejected(reason)

    def add_observer(self, observer: ServeObserver) -> None:
        """Add an observer; before `start` (the step loop reads the list without a lock)."""
        if self._started:
            raise RuntimeError("observers are added before the engine starts serving")
        self.observers.append(observer)
