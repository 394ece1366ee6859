"""`AsyncEngine`: one `Engine` serving requests that arrive while it runs, for asyncio code.

A thread runs the engine's own step loop (`Pipeline.run`) over an `OpenRequestBook` for as long as the engine
serves: there is no second loop. `add_request` (on the event loop) validates a request, checks the queue bound and
drops the request into the book's inbox; the step loop admits it between two steps. Tokens go the other way: the
step loop appends them to an outbox and wakes the event loop at most once per batch of appends, and the event loop
hands them to each request's `RequestStream`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.open_book import OpenRequestBook
from ..core.stats import StepStats, cpu_times
from ..core.types import Output, TokenEvent
from .base import CPU_EVERY, LiveEngine, ServeObserver
from .errors import EngineDeadError
from .protocol import ServedModel, served_model_name
from .stream import RequestStream

if TYPE_CHECKING:
    from ..core.engine import Engine
    from ..core.requests import RequestState

log = logging.getLogger("asyncbatch")
_LOOP_ENDED = object()
_TOKEN, _END = "token", "end"  # what an outbox item carries


def served_model(engine: Engine) -> ServedModel:
    """The served model of `engine`, as request parsing sees it."""
    return ServedModel(served_model_name(engine.config), engine.tokenizer, engine.max_len, engine.geometry["vocab"])


class AsyncEngine(LiveEngine):
    """Serve an `Engine` to asyncio code: `stream = live.add_request(prompt, params)`, then
    `async for event in stream`.

    Use it as `async with AsyncEngine(engine) as live:`, or call `start()` and `shutdown()` from the event loop that
    reads the streams. While it serves, it holds the engine: `engine.generate` from another thread waits until it
    has shut down. `max_waiting` bounds the requests that wait for a row (default `engine.serve.max_waiting`).
    `observers` receive its measurements (`ServeObserver`).
    """

    def __init__(self, engine: Engine, *, max_waiting: int | None = None,
                 observers: Sequence[ServeObserver] = ()) -> None:
        self.engine = engine
        self.max_waiting = engine.config.serve.max_waiting if max_waiting is None else max_waiting
        self.observers = list(observers)
        self.served = served_model(engine)
        self.intake = engine.intake
        self._streams: dict[str, RequestStream] = {}  # not ended yet; the event loop's, read by the step loop
        self._outbox: deque = deque()
        self._wake_pending = False
        self._ids = itertools.count()
        self._book: OpenRequestBook | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (step loop thread, whole process) CPU seconds, read together on the loop's thread every CPU_EVERY steps and
        # when it goes idle: a clock read per step would be a system call on the hot path, and clocks read apart
        # (the loop's at its last step, the process's at a scrape) would count loop time as serving's.
        self._cpu_pair = (0.0, time.process_time())
        self._loop_cpu_base: float | None = None  # the loop thread's CPU time when serving started
        self._steps = 0
        self._all_ended: asyncio.Event | None = None
        self._notify_finish = engine.host.has_lifecycle_impls("asyncbatch_request_finished")
        self._notify_step = engine.host.has_lifecycle_impls("asyncbatch_step_finished")

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        """Start the step loop and return once it serves (after any warm-up). Call once, on the event loop that
        will read the streams."""
        if self._thread is not None:
            raise RuntimeError("this AsyncEngine was already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._all_ended = asyncio.Event()
        self._all_ended.set()
        engine = self.engine
        self._book = OpenRequestBook(num_blocks=engine.num_blocks, num_rows=engine.config.batch.max_seqs,
                                     block_size=engine.config.cache.block_size, prefix_cache=engine.new_prefix_cache(),
                                     on_finish=self._on_finish, on_idle=self._read_cpu)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="asyncbatch-serve", daemon=True)
        self._thread.start()
        await asyncio.to_thread(ready.wait)
        if self._failure is not None:
            raise EngineDeadError(f"the engine failed to start serving: {self._failure}") from self._failure
        self._accepting = True

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` seconds (default
        `engine.serve.shutdown_timeout_s`), cancel the rest, and stop the step loop. Every response that completed,
        before or during the shutdown, stays readable from its stream."""
        self._accepting = False
        if self._thread is None or self._book is None:
            return
        await self.drain(timeout)
        self._book.close()
        await asyncio.to_thread(self._thread.join)
        self._drain()

    def _shutdown_timeout(self) -> float:
        return self.engine.config.serve.shutdown_timeout_s

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ requests
    def _submit(self, state: RequestState) -> None:
        self._book.submit(state)  # type: ignore[union-attr]

    def abort(self, request_id: str) -> bool:
        """Cancel a request (any thread): it ends with finish reason `cancelled` at the next step and its KV blocks
        and row are freed. False if no running request has that id."""
        return self._book.cancel(request_id) if self._book is not None else False

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics (`LiveEngine.stats`); the HTTP side shares this process, so it has no CPU time
        of its own (`front_end_cpu_s` is None)."""
        book = self._book
        loop_cpu, engine_cpu = self._cpu_pair
        cpu = {"step_loop_cpu_s": loop_cpu, "engine_cpu_s": engine_cpu, "front_end_cpu_s": None, "handover_s": None}
        if book is None:
            return {"waiting": 0, "running": 0, "kv_blocks_used": 0, "kv_blocks_total": self.engine.num_blocks - 1,
                    **cpu}
        return {"waiting": book.num_queued, "running": book.num_running, "kv_blocks_used": book.blocks.num_owned,
                "kv_blocks_total": book.blocks.size, **cpu}

    # ------------------------------------------------------------------ the step loop's thread
    def _serve(self, ready: threading.Event) -> None:
        engine = self.engine
        try:
            # Serving is one run that lasts until shutdown: it holds the engine as `Engine.run` does.
            with engine.held():
                if engine.warms_up:  # requests may take any sampling path: warm them all before serving
                    engine.warm.modes(("greedy", "sample", "filter"))
                engine.runtime.reset_timeline()
                self._loop_cpu_base = time.thread_time()
                self._read_cpu()
                ready.set()
                assert self._book is not None
                engine.pipeline.run(self._book, on_token=self._on_token, on_step=self._on_step, keep_steps=False)
        except BaseException as exc:  # noqa: BLE001  (reported to every open stream, and by start())
            log.error("the serving step loop stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._failure = exc
        finally:
            ready.set()
            self._post(_LOOP_ENDED)

    def _on_token(self, event: TokenEvent) -> None:
        if event.token_id < 0:  # ended without a token: its Output says why
            return
        seen = time.perf_counter()
        stream = self._streams.get(event.request_id)
        if stream is not None:
            self._post((_TOKEN, stream, event, seen))

    def _on_finish(self, output: Output) -> None:
        stream = self._streams.get(output.request_id)
        if stream is not None:
            self._post((_END, stream, output, time.perf_counter() - stream.arrival))
        if self._notify_finish:
            self.engine.host.notify("asyncbatch_request_finished", output=output)

    def _read_cpu(self) -> None:
        loop, process = cpu_times()
        self._cpu_pair = (loop - (self._loop_cpu_base or 0.0), process)

    def _on_step(self, stats: StepStats) -> None:
        self._steps += 1
        if self._steps % CPU_EVERY == 0:
            self._read_cpu()
        for o in self.observers:
            o.step(stats)
        if self._notify_step:
            self.engine.host.notify("asyncbatch_step_finished", stats=stats)

    def _post(self, item: Any) -> None:
        self._outbox.append(item)
        if not self._wake_pending:  # one wake-up for everything appended before the event loop drains
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._drain)  # type: ignore[union-attr]
            except RuntimeError:  # the event loop is closed: nobody is left to read
                pass

    # ------------------------------------------------------------------ the event loop's thread
    def _drain(self) -> None:
        self._wake_pending = False  # before popping: an append racing with this drain schedules another
        while self._outbox:
            item = self._outbox.popleft()
            if item is _LOOP_ENDED:
                if self._failure is not None:
                    dead = EngineDeadError(f"the engine stopped serving: {type(self._failure).__name__}: "
                                           f"{self._failure}")
                    for stream in list(self._streams.values()):
                        stream._fail(dead)
                        self._ended(stream)
                continue
            kind, stream, what, when = item  # when: the host-clock reading of a token, a request's age at its end
            if kind is _TOKEN:
                seen = when
                for o in self.observers:
                    if stream.last_seen is None:
                        o.first_token(seen - stream.arrival)
                    else:
                        o.token_gap(seen - stream.last_seen)
                stream.last_seen = seen
                stream._token(what, seen)
            else:
                for o in self.observers:
                    o.finished(what, when)
                stream._finish(what)
            if stream.ended:
                self._ended(stream)

    def _ended(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if not self._streams:
            self._all_ended.set()  # type: ignore[union-attr]
