"""A request book that takes requests while its run goes on: the hand-off between a serving front and the step loop.

The front (any thread) calls `submit`, `cancel` and `close`; everything else belongs to the step loop, exactly as
in `RequestBook`. A submitted request waits in a lock-protected inbox until the loop's next `admit_arrivals`,
between two steps, so the loop never waits on the device for an arrival; its arrival time is that moment on the
run's clock. When nothing is unfinished the loop blocks in `wait_for_arrivals` until a request comes or the book is
closed; a closed book ends the run once its last request has ended. A serving run lasts as long as the server, so
the book keeps no history: a request's output is handed to `on_finish` and then forgotten.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import attrs

from .book import RequestBook
from .requests import RequestState, Status
from .types import Output, TokenEvent


class BookClosedError(RuntimeError):
    """`submit` after `close`: the front must stop submitting before it closes the book."""


class OpenRequestBook(RequestBook):
    def __init__(self, *, num_blocks: int, num_rows: int, on_finish: Callable[[Output], None] | None = None,
                 on_end: Callable[[TokenEvent], None] | None = None, block_size: int = 16,
                 prefix_cache: object = None, on_idle: Callable[[], None] | None = None) -> None:
        """`on_idle` is called on the step loop's thread each time the loop is about to block for arrivals
        (nothing unfinished): a front end sends what is pending, or takes a last reading of its clocks."""
        super().__init__((), num_blocks=num_blocks, num_rows=num_rows, on_finish=on_finish, on_end=on_end,
                         block_size=block_size, prefix_cache=prefix_cache)
        self._on_idle = on_idle
        self._cond = threading.Condition()
        self._inbox: list[RequestState] = []
        self._live: dict[str, RequestState] = {}  # submitted and not ended (inbox included), by id
        self._open = True
        self._next_index = 0

    # ---- the front (any thread)
    def submit(self, state: RequestState) -> None:
        """Hand one request to the run. It is numbered in submission order, which orders waiting requests of equal
        arrival time. Raises `ValueError` if a live request has its id, `BookClosedError` after `close`."""
        with self._cond:
            if not self._open:
                raise BookClosedError("the book is closed: no request can be submitted any more")
            rid = state.request_id
            if rid in self._live:
                raise ValueError(f"request id {rid!r} is already used by a request that has not ended")
            state.index = self._next_index
            self._next_index += 1
            self._live[rid] = state
            self._inbox.append(state)
            self._cond.notify()

    def cancel(self, request_id: str) -> bool:
        """Mark a live request for cancellation at the next step; False if no live request has that id."""
        with self._cond:
            if request_id not in self._live:
                return False
            with self._cancel_lock:
                self.cancelled.add(request_id)
        return True

    def cancel_all(self) -> int:
        """Mark every live request for cancellation (nobody is left to read them); how many there were."""
        with self._cond:
            with self._cancel_lock:
                self.cancelled.update(self._live)
            return len(self._live)

    def close(self) -> None:
        """No more submissions: the run ends once every submitted request has ended."""
        with self._cond:
            self._open = False
            self._cond.notify_all()

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def num_queued(self) -> int:
        """Requests without a row: submitted but not admitted yet, plus waiting ones (preempted included). Any thread
        may read it: the moves that could make it under-count for a moment (inbox to waiting, sorting waiting, which
        empties the list while it sorts) happen under the lock."""
        with self._cond:
            return len(self._inbox) + len(self.waiting)

    @property
    def num_running(self) -> int:
        """Requests holding a row (a snapshot, any thread)."""
        return len(self.running)

    # ---- the step loop
    def queue_sizes(self) -> tuple[int, int]:
        """(`num_queued`, `num_running`) for the step loop's own thread, without the lock: only that thread moves
        requests out of the inbox and between `waiting` and `running`, so it never sees such a move half done."""
        return len(self._inbox) + len(self.waiting), len(self.running)

    @property
    def unfinished(self) -> int:
        return len(self._live)

    def next_arrival(self) -> float | None:
        # An inbox filled after this step's admit_arrivals: "arrived now", so the loop admits it instead of calling
        # the run stuck.
        return 0.0 if self._inbox else None

    def admit_arrivals(self, now: float) -> None:
        if not self._inbox:  # the common case: no lock taken
            return
        failed = []
        with self._cond:
            for r in self._inbox:
                if r.request_id not in self._live:  # cancelled while in the inbox: already recorded
                    continue
                if r.status is Status.FINISHED:  # failed validation
                    failed.append(r)
                else:
                    # It arrives in the run now, on the run's clock (which only this thread may read: the sim
                    # runtime's clock moves when read); the front keeps its own host-clock submission time.
                    r.request = attrs.evolve(r.request, arrival_time=now)
                    self.waiting.append(r)
            self._inbox = []
            self.waiting.sort(key=lambda r: (r.arrival_time, r.index))
        for r in failed:
            self._record(r)  # outside the lock: it calls back into the front

    def wait_for_arrivals(self) -> bool:
        if self._on_idle is not None:
            self._on_idle()
        with self._cond:
            while self._open and not self._inbox:
                self._cond.wait()
            return bool(self._inbox)

    def preempt(self, req: RequestState) -> None:
        with self._cond:  # it re-sorts `waiting`, which `num_queued` reads
            super().preempt(req)

    def apply_cancellations(self, now: float) -> None:
        if not self.cancelled:
            return
        with self._cancel_lock:
            ids, self.cancelled = self.cancelled, set()
        for rid in ids:
            with self._cond:
                req = self._live.get(rid)
            if req is not None:
                self.finish(req, "cancelled", now)

    def _record(self, req: RequestState) -> None:
        with self._cond:  # forgotten first, so that on_finish's receiver may reuse the id at once
            self._live.pop(req.request_id, None)
        super()._record(req)
        del self.outputs[req.index]  # handed to on_finish: the book keeps no history
