"""`RemoteEngine`: the HTTP front end's handle on an engine whose step loop runs in another process.

It validates and seeds requests with its own copy of the engine's `Intake` (same rules, same derived seeds), so a
bad request is refused here without a round trip, and sends the rest over the pipe. A reader thread hands each
message to the event loop: one wake-up per engine step, which carries every token of that step (see `engine_core`
for the messages). Time stamps stay comparable across the two processes: `perf_counter` reads the system's
monotonic clock.

Steps arrive through a shared-memory ring (`StepRing`), which nobody is woken for: while requests are open the
reader polls it (and the pipe) every `POLL_S`, for at most that much added latency per step. The engine's process
never pays for waking this one; a write to a socket that a process sleeps on cost the writer ~0.1 ms on the
virtual machines GPUs are rented on. With nothing open, the reader sleeps on the pipe and on a wake-up pipe of its
own, which `add_request` writes to.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import RequestError
from ..core.stats import StepStats
from ..core.types import TokenEvent
from .base import LiveEngine, ServeObserver
from .errors import EngineDeadError
from .ring import StepRing
from .stream import RequestStream

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..core.intake import Intake
    from ..core.requests import RequestState
    from .protocol import ServedModel

log = logging.getLogger("asyncbatch")
POLL_S = 0.0002


class RemoteEngine(LiveEngine):
    """The app's end of `EngineCore`. `on_lost` is called (on the event loop) if the engine's process goes away or
    its step loop dies, so that the server can stop instead of answering 503 for ever."""

    def __init__(self, conn: Connection, *, ring_name: str, served: ServedModel, intake: Intake, max_waiting: int,
                 shutdown_timeout_s: float, on_lost: Callable[[], Any] | None = None,
                 observers: Sequence[ServeObserver] = ()) -> None:
        self.conn = conn
        self.ring = StepRing(name=ring_name)
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.Lock()
        self._sleeping = False
        self.served = served
        self.intake = intake
        self.max_waiting = max_waiting
        self.shutdown_timeout_s = shutdown_timeout_s
        self.on_lost = on_lost
        self.observers = list(observers)
        self._streams: dict[str, RequestStream] = {}
        self._by_handle: dict[int, RequestStream] = {}  # the same streams, by the handle the engine names them by
        self._handle_of: dict[str, int] = {}
        self._handles = itertools.count()
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._sent_adds = 0
        # The engine's last report: waiting, running, KV blocks used and in all, adds handled, step loop CPU,
        # engine process CPU, step loop time spent handing steps over.
        self._counts: tuple = (0, 0, 0, 0, 0, 0.0, 0.0, 0.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._closed: asyncio.Event | None = None
        self._all_ended: asyncio.Event | None = None

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        if self._started:
            raise RuntimeError("this RemoteEngine was already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._closed = asyncio.Event()
        self._all_ended = asyncio.Event()
        self._all_ended.set()
        threading.Thread(target=self._read, name="asyncbatch-engine-reader", daemon=True).start()
        await self._ready  # raises EngineDeadError if the engine failed while warming up
        self._accepting = True

    async def shutdown(self, timeout: float | None = None) -> None:
        self._accepting = False
        if self._closed is None or self._closed.is_set():
            return
        await self.drain(timeout)
        self._send(("close",))
        await self._closed.wait()  # the engine ends its run once the cancelled requests have ended

    def _shutdown_timeout(self) -> float:
        return self.shutdown_timeout_s

    # ------------------------------------------------------------------ requests
    def _submit(self, state: RequestState) -> None:
        handle = next(self._handles)
        self._by_handle[handle] = self._streams[state.request_id]
        self._handle_of[state.request_id] = handle
        self._sent_adds += 1
        self._send(("add", handle, state.request))
        with self._wake_lock:
            if self._sleeping:  # the reader sleeps on the pipe: this request's steps come by the ring
                self._sleeping = False
                os.write(self._wake_w, b"w")

    def abort(self, request_id: str) -> bool:
        stream = self._streams.get(request_id)
        if stream is None or stream.ended:
            return False
        self._send(("abort", request_id))
        return True

    def stats(self) -> dict[str, Any]:
        """`LiveEngine.stats`, as of the engine's last step. Requests sent since are counted as waiting."""
        queued, running, used, total, added, loop_cpu, engine_cpu, handover = self._counts
        return {"waiting": queued + self._sent_adds - added, "running": running, "kv_blocks_used": used,
                "kv_blocks_total": total, "step_loop_cpu_s": loop_cpu, "engine_cpu_s": engine_cpu,
                "front_end_cpu_s": time.process_time(), "handover_s": handover}

    def _send(self, message: tuple) -> None:
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            with self._send_lock:
                self.conn.send_bytes(data)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass  # the reader sees the pipe close and fails every stream

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        conn, ring = self.conn, self.ring
        post = self._loop.call_soon_threadsafe  # type: ignore[union-attr]
        try:
            while True:
                steps = ring.read_all()
                if steps:
                    post(self._steps, steps)
                if conn.poll(0):
                    try:
                        message = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        message = ("lost",)
                    steps = ring.read_all()  # published before the message was sent: they come first
                    if steps:
                        post(self._steps, steps)
                    post(self._handle, message)
                    if message[0] in ("closed", "lost"):
                        return
                    continue
                if steps:
                    continue
                with self._wake_lock:
                    self._sleeping = not self._streams
                if self._sleeping:
                    select.select([conn.fileno(), self._wake_r], [], [])
                    with self._wake_lock:
                        self._sleeping = False
                    os.set_blocking(self._wake_r, False)
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    time.sleep(POLL_S)
        except RuntimeError:  # the event loop is closed: nobody is left to read
            return

    # ------------------------------------------------------------------ the event loop's thread
    def _steps(self, steps: list[tuple]) -> None:
        for step in steps:
            self._step(*step)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":  # one the ring had no room for
            self._step(*message[1:])
        elif kind == "ready":
            self._counts = message[1]
            if not self._ready.done():  # type: ignore[union-attr]
                self._ready.set_result(None)  # type: ignore[union-attr]
        elif kind == "reject":
            stream = self._streams.get(message[1])
            if stream is not None:
                stream._fail(RequestError(message[2]))
                self._ended(stream)
        elif kind == "closed":
            self._closed.set()  # type: ignore[union-attr]
            self._release()
        else:  # "dead" (the step loop raised) or "lost" (the engine's process is gone)
            reason = message[1] if kind == "dead" else "the engine's process exited"
            self._die(reason)
            if kind == "lost":  # the reader has returned
                self._release()

    def _step(self, seen: float, run_time: float, pairs: list[int], reasons: dict[int, str], outputs: list,
              stats: list[StepStats], counts: tuple | None) -> None:
        if counts is not None:  # None: unchanged since the last step that sent them
            self._counts = counts
        streams, by_handle, observers = self._streams, self._by_handle, self.observers
        for i in range(len(pairs) >> 1):
            stream = by_handle.get(pairs[2 * i])
            if stream is None:
                continue
            rid = stream.request_id
            for o in observers:
                if stream.last_seen is None:
                    o.first_token(seen - stream.arrival)
                else:
                    o.token_gap(seen - stream.last_seen)
            stream.last_seen = seen
            # The engine sends each delivered token once and in order: the count so far is this one's index.
            event = TokenEvent(rid, pairs[2 * i + 1], stream.num_tokens, run_time, reasons.get(i) if reasons else None)
            stream._token(event, seen)
            if stream.ended:
                self._ended(stream)
        for output in outputs:
            stream = streams.get(output.request_id)
            if stream is None:
                continue
            for o in observers:
                o.finished(output, seen - stream.arrival)
            stream._finish(output)
            if stream.ended:
                self._ended(stream)
        for one in stats:  # the engine sends them in batches (see `EngineCore._flush`)
            for o in observers:
                o.step(one)

    def _die(self, reason: str) -> None:
        first = self._failure is None
        if first:
            self._failure = EngineDeadError(reason)
            log.error("the engine stopped serving: %s", reason)
        dead = EngineDeadError(f"the engine stopped serving: {reason}")
        if not self._ready.done():  # type: ignore[union-attr]
            self._ready.set_exception(EngineDeadError(f"the engine failed to start serving: {reason}"))
        for stream in list(self._streams.values()):
            stream._fail(dead)
            self._ended(stream)
        self._closed.set()  # type: ignore[union-attr]
        if first and self.on_lost is not None:
            self.on_lost()

    def _release(self) -> None:
        """The reader has returned (after "closed" or a lost pipe): unmap the ring, close the wake-up pipe."""
        if self._wake_w >= 0:
            self.ring.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def _ended(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            del self._by_handle[self._handle_of.pop(stream.request_id)]
        if not self._streams:
            self._all_ended.set()  # type: ignore[union-attr]
