"""`RequestStream`: one request's tokens, read with `async for`, as the engine's host learns them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..core.errors import RequestError
from ..core.types import Output, TokenEvent

_END = object()


class RequestStream:
    """The tokens of one request of an `AsyncEngine`: `async for event in stream` yields one `TokenEvent` per
    generated token and stops when the request ends; `output` then holds its `Output` (finish reason, all tokens).

    Made by `AsyncEngine.add_request`; fed by the engine on the event loop's thread. A request that failed (it could
    not be scheduled, or the engine died) raises at the end of its iteration: `RequestError` with the reason, or
    `EngineDeadError`. A consumer cancelled while it waits for a token aborts the request (a client that went away
    frees its KV blocks); `abort()` does it explicitly.

    Times are host clock readings (`time.perf_counter()`): `arrival` when the request was submitted, `token_times`
    when the step loop read each token from the device.
    """

    def __init__(self, request_id: str, prompt_ids: tuple[int, ...], arrival: float,
                 abort: Callable[[str], bool]) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.arrival = arrival
        self.token_times: list[float] = []
        self.output: Output | None = None
        self.failure: BaseException | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._received = 0
        self._ended = False
        self._drained = False
        self._abort = abort
        self.last_seen: float | None = None  # when the step loop read its last token (the event loop's note)

    # ---- the consumer
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._drained:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.abort()
            raise
        if item is _END:
            self._drained = True
            self._raise_if_failed()
            raise StopAsyncIteration
        return item

    async def result(self) -> Output:
        """Read the rest of the stream; the request's `Output` (raises like the iteration does)."""
        async for _ in self:
            pass
        self._raise_if_failed()
        assert self.output is not None
        return self.output

    def abort(self) -> bool:
        """Cancel the request: it ends with finish reason `cancelled` at the next step, and its blocks and row are
        freed. False if it has already ended."""
        return False if self._ended else self._abort(self.request_id)

    @property
    def ended(self) -> bool:
        """The engine is done with this request (its events may still wait to be read)."""
        return self._ended

    @property
    def num_tokens(self) -> int:
        return self._received

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.output is not None and self.output.finish_reason == "error":
            raise RequestError(self.output.error or f"request {self.request_id!r} failed")

    # ---- the engine (event loop thread)
    def _token(self, event: TokenEvent, seen: float) -> None:
        self.token_times.append(seen)
        self._received += 1
        self._queue.put_nowait(event)
        self._maybe_end()

    def _finish(self, output: Output) -> bool:
        self.output = output
        return self._maybe_end()

    def _fail(self, exc: BaseException) -> None:
        if not self._ended:
            self.failure = exc
            self._ended = True
            self._queue.put_nowait(_END)

    def _maybe_end(self) -> bool:
        # A request's output is recorded before its last token reaches the token callback: it ends once every token
        # the output names has been delivered too.
        if self._ended or self.output is None or self._received < len(self.output.token_ids):
            return False
        self._ended = True
        self._queue.put_nowait(_END)
        return True
