"""What the HTTP app needs of a live engine (`LiveEngine`), and what a serving engine reports (`ServeObserver`).

Two live engines implement it: `AsyncEngine`, whose step loop is a thread of the app's own process, and
`RemoteEngine`, the app's end of a step loop that runs in another process (`engine.serve.front_end`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.stats import StepStats
    from ..core.types import Output, SamplingParams
    from .protocol import ServedModel
    from .stream import RequestStream


class ServeObserver:
    """Receives what a serving engine measures (the metrics of `asyncbatch serve` subclass it); the defaults do
    nothing. With `AsyncEngine`, `step` is called on the step loop's thread, once per step, so it must be quick and
    thread-safe; with `RemoteEngine` it comes on the event loop's thread, when the step's tokens arrive. The
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
    call `add_request` and `abort` on that loop; `stats` is read by metric scrapes. Nothing here may block the event
    loop on the device: a step that is slow delays tokens, never the loop.
    """

    @abstractmethod
    async def start(self) -> None:
        """Return once the step loop serves (after any warm-up); raise `EngineDeadError` if it cannot start."""

    @abstractmethod
    async def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, let those in flight finish for up to `timeout` seconds (default
        `engine.serve.shutdown_timeout_s`), cancel the rest, stop the step loop. Completed responses stay readable."""

    @abstractmethod
    def add_request(self, prompt: Sequence[int] | str, params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> RequestStream:
        """Submit one request and return its stream at once. Raises, submitting nothing: `RequestError` (the
        request is invalid), `QueueFullError`, `EngineClosedError`, `EngineDeadError`, or `ValueError` for an id
        still in use."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """Cancel a request: it ends with finish reason `cancelled`, its KV blocks and row freed. False if unknown."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics: `waiting`, `running`, `kv_blocks_used`, `kv_blocks_total`, and CPU seconds:
        `step_loop_cpu_s` (the step loop's thread since serving began), `engine_cpu_s` (the engine's whole
        process) and `front_end_cpu_s` (the HTTP process, or None when it is the engine's); `handover_s`, the step
        loop's time spent sending steps to a front-end process (None without one)."""

    # Shared state, set by each subclass's __init__ and start: what the app reads besides the five methods.
    served: ServedModel  # the served model as request parsing sees it (name, tokenizer, context, vocabulary)
    observers: list[ServeObserver]
    _started: bool = False
    _accepting: bool = False
    _failure: BaseException | None = None

    @property
    def accepting(self) -> bool:
        """Started, not shutting down, and the step loop alive."""
        return self._accepting and self._failure is None

    def add_observer(self, observer: ServeObserver) -> None:
        """Add an observer; before `start` (the step loop reads the list without a lock)."""
        if self._started:
            raise RuntimeError("observers are added before the engine starts serving")
        self.observers.append(observer)
