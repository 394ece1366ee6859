"""The engine's end of a front end that runs in another process (`engine.serve.front_end: process`).

The step loop runs on the calling thread over an `OpenRequestBook`, exactly as under `AsyncEngine`; what differs
is who is on the other side. A receiver thread blocks on the pipe (without the GIL) and turns each message into a
book call: `("add", handle, request)` submits, `("abort", id)` cancels, `("close",)` closes the book.

Each step's tokens and ended requests go to the front end in one message through a shared-memory ring
(`StepRing`): fixed-layout binary, no pickling and no system call, so a step costs the step loop a few struct
writes however many streams are open. A request is named there by the small integer handle the front end gave it.
Parsing, detokenising, JSON and the clients' sockets are the front end's work, in its own process. (A pickled
message per step over the pipe cost the loop 40-90 us per step on an H100 machine, a third of it the write.)

Other messages go by the pipe, pickled: `("ready", counts)` once warmed up, `("reject", id, reason)` for a request
that could not be submitted, `("dead", reason)` if the step loop failed, `("closed",)` when the run has ended, and a
`("step", ...)` that the ring had no room for. The front end drains the ring before it handles a pipe message.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

from ..core.open_book import BookClosedError, OpenRequestBook
from ..core.requests import Status
from ..core.stats import StepStats
from ..core.types import Output, TokenEvent
from .ring import StepRing

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..core.engine import Engine

log = logging.getLogger("asyncbatch")
CPU_EVERY = 32


class _FlushingBook(OpenRequestBook):
    """Sends what is pending before the idle loop blocks: a request cancelled while nothing else runs ends without
    a step, and its output would otherwise wait for the next one."""

    def __init__(self, *, before_wait: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._before_wait = before_wait

    def wait_for_arrivals(self) -> bool:
        self._before_wait()
        return super().wait_for_arrivals()


class EngineCore:
    """Serve `engine` to a front end at the other end of `conn` until it closes the book or goes away.

    `serve()` runs on the calling thread (the process's main thread, so that signals reach it) and returns the
    exception that stopped the step loop, or None after a clean end. The front end is told about either."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.lost = False  # the front end went away (its end of the pipe closed)
        self.ready = False  # warmed up and serving
        self.ring = StepRing()  # the steps go here; the pipe takes the rest (and a step the ring has no room for)
        self._send_lock = threading.Lock()
        self._handles: dict[str, int] = {}  # request id -> the front end's handle, while the request runs
        self._token_handles: list[int] = []  # the tokens since the last send: whose, which, at which index
        self._token_ids: list[int] = []
        self._token_index: list[int] = []
        self._reasons: dict[int, str] = {}  # position among them -> finish reason, for tokens that carry one
        self._run_time = 0.0
        self._outputs: list[Output] = []
        self._added = 0  # "add" messages handled, so the front end can tell how many are still on their way
        self._loop_cpu_s = 0.0
        self._handover_s = 0.0  # the step loop's time in `_on_step`: what handing a step over costs it
        self._pipe_steps = 0  # steps the ring had no room for
        self._receiver_cpu_s = 0.0
        self._steps_sent = 0
        self._cpu_pair = (0.0, time.process_time())  # (step loop, whole process) CPU seconds, read together
        self._loop_cpu_at: float | None = None
        self._notify_finish = engine.host.has_lifecycle_impls("asyncbatch_request_finished")
        self._notify_step = engine.host.has_lifecycle_impls("asyncbatch_step_finished")
        self.book = _FlushingBook(num_blocks=engine.num_blocks, num_rows=engine.config.batch.max_seqs,
                                  block_size=engine.config.cache.block_size, prefix_cache=engine.new_prefix_cache(),
                                  on_finish=self._on_finish, before_wait=self._flush)

    def serve(self) -> BaseException | None:
        engine = self.engine
        receiver = threading.Thread(target=self._receive, name="asyncbatch-front-end-receiver", daemon=True)
        try:
            with engine.held():
                if engine.warms_up:  # requests may take any sampling path: warm them all before serving
                    engine.warm.modes(("greedy", "sample", "filter"))
                engine.runtime.reset_timeline()
                self.ready = True
                self._send(("ready", self._counts()))
                receiver.start()
                engine.pipeline.run(self.book, on_token=self._on_token, on_step=self._on_step, keep_steps=False)
        except BaseException as exc:  # noqa: BLE001  (the front end fails its streams with it; the caller exits)
            log.error("the serving step loop stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._send(("dead", f"{type(exc).__name__}: {exc}"))
            return exc
        self._flush()
        self._send(("closed",))
        if self._steps_sent:
            n = self._steps_sent
            log.info("handed %d steps to the front end: %.1f us per step in the step loop; %d by the pipe (no room in "
                     "the ring); the receiver thread took %.1f us of CPU per step", n, self._handover_s / n * 1e6,
                     self._pipe_steps, self._receiver_cpu_s / n * 1e6)
        return None

    # ------------------------------------------------------------------ the receiver thread
    def _receive(self) -> None:
        intake, book = self.engine.intake, self.book
        start = time.thread_time()
        while True:
            self._receiver_cpu_s = time.thread_time() - start
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                self._front_end_gone()
                return
            kind = message[0]
            if kind == "add":
                _, handle, request = message
                state = intake.state(request, 0, validated=True)  # the front end's Intake has the same settings
                try:
                    if state.status is Status.FINISHED:
                        raise ValueError(state.error or "invalid request")
                    self._handles[request.request_id] = handle
                    book.submit(state)
                except (ValueError, BookClosedError) as exc:
                    self._handles.pop(request.request_id, None)
                    self._send(("reject", request.request_id, str(exc)))
                self._added += 1
            elif kind == "abort":
                book.cancel(message[1])
            elif kind == "close":
                book.close()
                return

    def _front_end_gone(self) -> None:
        if not self.lost:
            self.lost = True
            n = self.book.cancel_all()
            log.error("the HTTP front end went away: cancelling %d requests and stopping", n)
        self.book.close()

    # ------------------------------------------------------------------ the step loop's thread
    def _on_token(self, event: TokenEvent) -> None:
        if event.token_id < 0:  # a request that ends without a token: its Output says why
            return
        if event.finish_reason is not None:
            self._reasons[len(self._token_ids)] = event.finish_reason
        self._token_handles.append(self._handles[event.request_id])
        self._token_ids.append(event.token_id)
        self._token_index.append(event.index)
        self._run_time = event.time  # one update reads one clock time for all its tokens

    def _on_finish(self, output: Output) -> None:
        self._outputs.append(output)
        if self._notify_finish:
            self.engine.host.notify("asyncbatch_request_finished", output=output)

    def _on_step(self, stats: StepStats) -> None:
        start = time.perf_counter()
        now_cpu = time.thread_time()
        if self._loop_cpu_at is not None:
            self._loop_cpu_s += now_cpu - self._loop_cpu_at
        self._loop_cpu_at = now_cpu
        if self._notify_step:
            self.engine.host.notify("asyncbatch_step_finished", stats=stats)
        self._flush(stats)
        self._handover_s += time.perf_counter() - start  # reported with the next step's message

    def _flush(self, stats: StepStats | None = None) -> None:
        if stats is None and not self._token_ids and not self._outputs:
            return
        outputs, self._outputs = self._outputs, []
        reasons = self._reasons
        counts = self._counts()
        seen = time.perf_counter()
        extra = (reasons, outputs) if reasons or outputs else None
        if not self.ring.write(seen, self._run_time, self._token_handles, self._token_ids, self._token_index, extra,
                               stats, counts):
            self._send(("step", seen, self._run_time, self._token_handles, self._token_ids, self._token_index,
                        reasons, outputs, stats, counts))
            self._pipe_steps += 1
        self._steps_sent += 1
        self._token_handles, self._token_ids, self._token_index, self._reasons = [], [], [], {}
        for output in outputs:  # its tokens, the last included, are in this message or an earlier one
            self._handles.pop(output.request_id, None)

    def _counts(self) -> tuple:
        """What the front end's `stats()` reports between two messages (see `RemoteEngine.stats`). The process's
        CPU time is read every `CPU_EVERY` steps and when the loop goes idle: the kernel sums it over every thread
        of the process, which is not free in a process with many. The step loop's CPU time is reported as of the
        same reading, so that their difference (serving's cost outside the loop) stays right."""
        book = self.book
        if self._steps_sent % CPU_EVERY == 0 or book.unfinished == 0:
            self._cpu_pair = (self._loop_cpu_s, time.process_time())
        return (book.num_queued, book.num_running, book.blocks.num_owned, book.blocks.size, self._added,
                *self._cpu_pair, self._handover_s)

    def _send(self, message: tuple) -> None:
        self._send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_bytes(self, data: bytes) -> None:
        # Plain pickle and `send_bytes`: `Connection.send` builds a multiprocessing pickler (and copies its
        # dispatch table) for every message, which the step loop would pay once per step.
        if self.lost:
            return
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            self._front_end_gone()
