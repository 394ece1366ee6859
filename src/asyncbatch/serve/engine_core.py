"""The engine's end of a front end that runs in another process (`engine.serve.front_end: process`).

The step loop runs on the calling thread over an `OpenRequestBook`, as under `AsyncEngine`; what differs is who is
on the other side, and that the book itself collects each step's tokens as one flat list of (handle, token id)
pairs, so no `TokenEvent` is built per token. A receiver thread blocks on the pipe (without the GIL) and turns
each message into a book call: `("add", handle, request)` submits, `("abort", id)` cancels, `("close",)` closes
the book.

Each step's tokens go to the front end in one message through a shared-memory ring (`StepRing`): fixed-layout
binary, no pickling and no system call. A request is named there by the small integer handle the front end gave
it. Most steps carry only their tokens (and the counts, when they changed); every `CPU_EVERY` steps, when a
request ends and when the loop goes idle, a full message adds the steps' stats, the CPU clocks and the ended
requests' outputs. On the H100 machines the hand-over's Python runs cold after the wait for the device, so every
line and every packed number shows: the spare common step took it from 37-48 us to 21-27 us per step. Parsing,
detokenising, JSON and the clients' sockets are the front end's work, in its own process. (A pickled message per
step over the pipe cost the loop 40-90 us per step on an H100 machine, a third of it the write.)

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
from ..core.stats import StepStats, cpu_times
from ..core.types import Output
from .base import CPU_EVERY
from .ring import StepRing

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..core.engine import Engine
    from .pinning import CpuPlan

log = logging.getLogger("asyncbatch")
STRAYS_AFTER = 4  # steps handed over before threads started by the step loop are moved off its core


class _ServingBook(OpenRequestBook):
    """The book of a served run. It collects each delivered token as the front end's handle and the token, in one
    flat list (and a finish reason by position, for the few tokens that end a request), without a `TokenEvent` per
    token: the step loop then hands the list over as it is."""

    def __init__(self, *, handles: dict[str, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handles = handles
        self.pairs: list[int] = []  # handle, token, handle, token... of the tokens delivered since the last take
        self.reasons: dict[int, str] = {}  # a token's position in `pairs` // 2 -> the finish reason it brought
        self.taken_at = 0.0  # the clock reading of the last token taken

    def apply_token(self, entry: Any, token: int, now: float) -> None:
        req = entry.req
        delivered = req.status is not Status.FINISHED  # else a token in flight for a request that already ended
        super().apply_token(entry, token, now)  # the pipeline turned `token_events` off: it builds no event
        if delivered:
            pairs = self.pairs
            if req.status is Status.FINISHED:
                self.reasons[len(pairs) >> 1] = req.finish_reason
            pairs.append(self._handles[req.request_id])
            pairs.append(token)
            self.taken_at = now


class EngineCore:
    """Serve `engine` to a front end at the other end of `conn` until it closes the book or goes away.

    `serve()` runs on the calling thread (the process's main thread, so that signals reach it) and returns the
    exception that stopped the step loop, or None after a clean end. The front end is told about either."""

    def __init__(self, engine: Engine, conn: Connection, *, cpus: CpuPlan | None = None) -> None:
        self.engine = engine
        self.conn = conn
        self.cpus = cpus  # where the step loop and the rest run once serving starts; None: the kernel decides
        self.lost = False  # the front end went away (its end of the pipe closed)
        self.ready = False  # warmed up and serving
        self.ring = StepRing()  # the steps go here; the pipe takes the rest (and a step the ring has no room for)
        self._send_lock = threading.Lock()
        self._handles: dict[str, int] = {}  # request id -> the front end's handle, while the request runs
        self._outputs: list[Output] = []
        self._stats: list[StepStats] = []  # stats of the steps handed over since the last full message
        self._until_full = STRAYS_AFTER  # steps until the next full message (see `_on_step`)
        self._strays_moved = False
        self._added = 0  # "add" messages handled, so the front end can tell how many are still on their way
        self._loop_cpu_base = 0.0  # the step loop thread's CPU time when serving started
        self._handover_s = 0.0  # the step loop's time in `_on_step`: what handing a step over costs it
        self._sampled_wall_s = self._sampled_cpu_s = 0.0  # wall and CPU time of the full hand-overs
        self._pipe_steps = 0  # steps the ring had no room for
        self._receiver_cpu_s = 0.0
        self._steps_sent = 0
        self._last_sizes: tuple[int, int] = (-1, -1)  # queue sizes and adds handled as of the last counts sent
        self._last_added = -1
        self._last_counts: tuple = ()
        self._cpu_pair = (0.0, time.process_time())  # (step loop, whole process) CPU seconds, read together
        self._notify_finish = engine.host.has_lifecycle_impls("asyncbatch_request_finished")
        self._notify_step = engine.host.has_lifecycle_impls("asyncbatch_step_finished")
        self.book = _ServingBook(handles=self._handles, num_blocks=engine.num_blocks,
                                 num_rows=engine.config.batch.max_seqs, block_size=engine.config.cache.block_size,
                                 prefix_cache=engine.new_prefix_cache(), on_finish=self._on_finish,
                                 on_idle=self._flush)  # a request cancelled while nothing runs ends without a step

    def serve(self) -> BaseException | None:
        engine = self.engine
        receiver = threading.Thread(target=self._receive, name="asyncbatch-front-end-receiver", daemon=True)
        try:
            with engine.held():
                if engine.warms_up:  # requests may take any sampling path: warm them all before serving
                    engine.warm.modes(("greedy", "sample", "filter"))
                engine.runtime.reset_timeline()
                if self.cpus is not None:
                    from .pinning import pin_engine_process

                    pin_engine_process(self.cpus)
                self.ready = True
                self._loop_cpu_base = time.thread_time()
                self._send(("ready", self._counts(self.book.queue_sizes(), cpu=True)))
                receiver.start()
                engine.pipeline.run(self.book, on_step=self._on_step, keep_steps=False)  # tokens: the book's
        except BaseException as exc:  # noqa: BLE001  (the front end fails its streams with it; the caller exits)
            log.error("the serving step loop stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._send(("dead", f"{type(exc).__name__}: {exc}"))
            return exc
        self._flush()
        self._send(("closed",))
        if self._steps_sent:
            n = self._steps_sent
            log.info("handed %d steps to the front end: %.1f us per step in the step loop (CPU over wall time %.2f, "
                     "full messages); %d by the pipe (no room in the ring); the receiver thread took %.1f us of CPU "
                     "per step", n, self._handover_s / n * 1e6, self._sampled_cpu_s / max(1e-12, self._sampled_wall_s),
                     self._pipe_steps, self._receiver_cpu_s / n * 1e6)
        return None

    # ------------------------------------------------------------------ the receiver thread
    def _receive(self) -> None:
        if self.cpus is not None:  # started by the step loop's thread, it inherited the loop's core
            from .pinning import pin_this_thread

            pin_this_thread(self.cpus.rest)
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
    def _on_finish(self, output: Output) -> None:
        self._outputs.append(output)
        if self._notify_finish:
            self.engine.host.notify("asyncbatch_request_finished", output=output)

    def _on_step(self, stats: StepStats) -> None:
        start = time.perf_counter()
        if self._notify_step:
            self.engine.host.notify("asyncbatch_step_finished", stats=stats)
        self._stats.append(stats)
        self._until_full -= 1
        if self._until_full and not self._outputs:  # the common step: its tokens, and counts that changed
            book = self.book
            sizes = book.queue_sizes()
            counts = self._counts(sizes) if sizes != self._last_sizes or self._added != self._last_added else None
            if self.ring.write_tokens(start, book.taken_at, book.pairs, counts):
                book.pairs = []
                self._steps_sent += 1
                self._handover_s += time.perf_counter() - start  # reported with the next counts sent
                return
        # Every CPU_EVERY-th step, a step that ended requests, and one the ring had no room for: the full message.
        self._until_full = CPU_EVERY
        cpu_start = time.thread_time()
        self._flush(start)
        if self.cpus is not None and not self._strays_moved:
            self._move_strays()
        end = time.perf_counter()
        self._handover_s += end - start
        # CPU against wall time of the full hand-overs: slow code, or a thread kept waiting?
        self._sampled_wall_s += end - start
        self._sampled_cpu_s += time.thread_time() - cpu_start

    def _move_strays(self) -> None:
        # A pool a library creates on first use from the step loop's thread (torch's, at the first steps) would
        # inherit the loop's core: moved once, at the first full message (after STRAYS_AFTER steps).
        from .pinning import move_strays

        self._strays_moved = True
        n = move_strays(self.cpus)  # type: ignore[arg-type]
        if n:
            log.info("CPU pinning: moved %d threads started by the step loop off its core", n)

    def _flush(self, seen: float = 0.0) -> None:
        """Send the full message: the tokens delivered since the last one sent, the stats of the steps since the
        last full message, fresh counts (CPU clocks included) and the ended requests' outputs. `seen` is when the
        step loop handed its step over, 0 when the loop goes idle or ends. A step's stats so reach the front end's
        metrics within `CPU_EVERY` steps, and the common step (`_on_step`) packs a few dozen numbers."""
        book, outputs, stats = self.book, self._outputs, self._stats
        pairs, reasons = book.pairs, book.reasons
        if not pairs and not outputs and not stats:
            return
        book.pairs, book.reasons, self._outputs, self._stats = [], {}, [], []
        counts = self._counts(book.queue_sizes(), cpu=True)
        seen = seen or time.perf_counter()
        if not self.ring.write(seen, book.taken_at, pairs, (reasons, outputs) if reasons or outputs else None, stats,
                               counts):
            self._send(("step", seen, book.taken_at, pairs, reasons, outputs, stats, counts))
            self._pipe_steps += 1
        self._steps_sent += 1
        for output in outputs:  # its tokens, the last included, are in this message or an earlier one
            self._handles.pop(output.request_id, None)

    def _counts(self, sizes: tuple[int, int], *, cpu: bool = False) -> tuple:
        """What the front end's `stats()` reports between two messages (see `RemoteEngine.stats`); `_flush` sends
        them only when the queues or the adds handled changed, or with a step's full message. Counting KV blocks
        walks the prefix cache's shared blocks, so it happens only then. The process's CPU time (the kernel sums it
        over every thread, which is not free in a process with many) and the step loop's are read only with a full
        message (`cpu`), and together, so that their difference (serving's cost outside the loop) stays right. Step
        loop thread only."""
        book = self.book
        if cpu:
            loop, process = cpu_times()
            self._cpu_pair = (loop - self._loop_cpu_base, process)
        self._last_sizes, self._last_added = sizes, self._added
        self._last_counts = (*sizes, book.blocks.num_owned, book.blocks.size, self._added, *self._cpu_pair,
                             self._handover_s)
        return self._last_counts

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
