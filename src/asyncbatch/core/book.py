"""The request book of one run: arrivals, admission order, finishes, preemption, resource release, outputs.

Host-only and torch-free. The pipeline calls it between device launches; every release is deferred to the
request's last batch (see `pools`), so in-flight batches can still touch what they were given.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .errors import StrategyError
from .kv_blocks import KVBlocks
from .pools import DeferredPool
from .requests import RequestState, Status
from .scheduling import BatchEntry, SchedulingState
from .types import FinishReason, Output, TokenEvent


class RequestBook:
    def __init__(self, requests: Sequence[RequestState], *, num_blocks: int, num_rows: int,
                 on_finish: Callable[[Output], None] | None = None,
                 on_end: Callable[[TokenEvent], None] | None = None, block_size: int = 16,
                 prefix_cache: Any = None) -> None:
        """`on_finish` gets every request's output when it ends; `on_end` gets a token-less event (`token_id` -1)
        for a request that ends without a token: cancelled, or failed (validation included). `prefix_cache`: the
        run's `PrefixCache` index (None: no sharing)."""
        self.states = list(requests)
        self._on_end = on_end
        self.token_events = True  # `apply_token` returns events; the pipeline turns it off for a run nobody streams
        self.blocks = KVBlocks(num_blocks, block_size, prefix_cache)  # block 0 is the trash block
        self.rows = DeferredPool(num_rows, name="row")
        self._arrivals = [(r.arrival_time, r.index, r) for r in self.states if r.status is Status.WAITING]
        heapq.heapify(self._arrivals)
        self.waiting: list[RequestState] = []  # arrived, no row; ordered by (arrival, index)
        self.running: list[RequestState] = []  # holds a row; admission order
        self.outputs: dict[int, Output] = {}
        self._admitted = 0
        self._on_finish = on_finish
        self.num_preemptions = 0
        self.cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self.ids = frozenset(r.request_id for r in self.states)
        for r in self.states:
            if r.status is Status.FINISHED:  # failed validation before the run
                self._record(r)

    # ---- arrivals and lists
    def admit_arrivals(self, now: float) -> None:
        arrived = False
        while self._arrivals and self._arrivals[0][0] <= now:
            self.waiting.append(heapq.heappop(self._arrivals)[2])
            arrived = True
        if arrived:
            self.waiting.sort(key=lambda r: (r.arrival_time, r.index))

    def next_arrival(self) -> float | None:
        return self._arrivals[0][0] if self._arrivals else None

    def wait_for_arrivals(self) -> bool:
        """Called by the pipeline when no request is unfinished and no batch is in flight: block until more requests
        arrive (True) or none ever will (False: the run ends). A book of fixed requests has none to wait for; an
        open book (`core.open_book`) waits for its front."""
        return False

    @property
    def unfinished(self) -> int:
        return len(self.states) - len(self.outputs)

    def schedulable(self) -> tuple[list[RequestState], list[RequestState]]:
        running = [r for r in self.running if r.status is Status.RUNNING and r.num_remaining > 0]
        waiting = [r for r in self.waiting if r.is_schedulable]
        return running, waiting

    def plan(self, scheduler: Any, batch: int, *, max_tokens: int, max_seqs: int,
             block_size: int, in_flight: int = 0) -> SchedulingState:
        """Open batch `batch`: free ids whose last use is over, preempt until running decodes fit, then let the
        scheduler fill a `SchedulingState`. The caller writes inputs, then calls `on_scheduled`."""
        self.blocks.begin_batch(batch)
        self.rows.begin_batch(batch)
        self._make_room(scheduler, block_size)
        running, waiting = self.schedulable()
        # What each waiting request would reuse if admitted now (`SchedulingState.cached_tokens`). With no free
        # row nobody can be admitted in this batch: the lookups wait, and no stale match can be admitted, since
        # every batch that has a free row matches afresh first.
        if self.blocks.cache is not None and self.rows.num_free:
            for r in waiting:
                self.blocks.attach(r)
        state = SchedulingState(batch, running, waiting, max_tokens=max_tokens, max_seqs=max_seqs,
                                blocks=self.blocks, rows=self.rows, block_size=block_size, in_flight=in_flight)
        scheduler.schedule(state)
        return state

    def _make_room(self, scheduler: Any, block_size: int) -> None:
        """Preempt (the scheduler picks the victim) until every running decode can get its next block."""
        running = [r for r in self.running if r.status is Status.RUNNING]

        def need() -> int:
            return sum(1 for r in running if r.is_decode and -(-(r.num_computed + 1) // block_size) > len(r.blocks))

        while running and self.blocks.num_free < need():
            victim = _victim(scheduler, running)
            self.preempt(victim)
            running.remove(victim)

    def break_deadlock(self, scheduler: Any) -> bool:
        """Nothing fits and nothing is in flight: preempt one running request (the scheduler's victim)."""
        running = [r for r in self.running if r.status is Status.RUNNING]
        if not running:
            return False
        self.preempt(_victim(scheduler, running))
        return True

    def on_scheduled(self, entries: Sequence[BatchEntry], batch: int) -> list[RequestState]:
        """After `SchedulingState.add` committed: move admitted requests, detect final tokens. Returns the
        requests admitted in this batch (their rows need binding)."""
        admitted = []
        for e in entries:
            req = e.req
            if e.admitted:
                self.waiting.remove(req)
                self.running.append(req)
                req.admit_order = self._admitted
                self._admitted += 1
                admitted.append(req)
            if self.blocks.cache is not None:
                self.blocks.publish(req)
            if e.samples and (req.num_generated >= req.max_new_tokens or req.total_len >= req.max_len):
                req.status = Status.FINISHING  # its last token is in flight: nothing more to schedule
                self._release(req, batch)
        return admitted

    # ---- lifecycle
    def _release(self, req: RequestState, last_batch: int) -> None:
        if req.status is Status.WAITING:  # a cached prefix attached, never held
            req.blocks, req.block_last_use, req.num_computed, req.num_cached = [], [], 0, 0
        elif req.blocks:
            if self.blocks.cache is not None:
                self.blocks.publish(req)  # what it computed stays for others (outputs included, for the next turn)
            self.blocks.release(req, last_batch)
            req.blocks = []
            req.block_last_use = []
        if req.row is not None:
            self.rows.release([req.row], last_batch, req)
            req.row = None
        if req in self.running:
            self.running.remove(req)

    def preempt(self, req: RequestState) -> None:
        """Give up `req`'s blocks and row; it re-prefills its prompt and outputs once its pending tokens land."""
        self._release(req, req.last_batch)
        req.status = Status.WAITING
        req.num_computed = 0
        req.num_cached = 0
        req.num_preemptions += 1
        req.admit_order = -1
        self.num_preemptions += 1
        self.waiting.append(req)
        self.waiting.sort(key=lambda r: (r.arrival_time, r.index))

    def finish(self, req: RequestState, reason: FinishReason, now: float, error: str | None = None) -> None:
        if req.status is Status.FINISHED:
            return
        self._release(req, req.last_batch)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finish_time = now
        self._record(req)

    def _record(self, req: RequestState) -> None:
        out = Output(
            request_id=req.request_id, prompt_ids=req.request.prompt_ids,
            token_ids=tuple(req.tokens[req.prompt_len :]), finish_reason=req.finish_reason or "error",
            error=req.error, token_times=tuple(req.token_times), arrival_time=req.arrival_time,
            finish_time=req.finish_time, num_preemptions=req.num_preemptions, num_cached_tokens=req.cached_total)
        self.outputs[req.index] = out
        if self._on_end is not None and out.finish_reason in ("cancelled", "error"):
            self._on_end(TokenEvent(req.request_id, -1, req.num_output, req.finish_time, out.finish_reason))
        if self._on_finish is not None:
            self._on_finish(out)

    def cancel(self, request_id: str) -> bool:
        """Mark `request_id` for cancellation at the next step (any thread). False if no request of this run has
        that id."""
        if request_id not in self.ids:
            return False
        with self._cancel_lock:
            self.cancelled.add(request_id)
        return True

    def apply_cancellations(self, now: float) -> None:
        if not self.cancelled:
            return
        with self._cancel_lock:  # swap under the lock: a cancel arriving meanwhile lands in the next set
            ids, self.cancelled = self.cancelled, set()
        for req in self.states:
            if req.request_id in ids and req.status is not Status.FINISHED:
                self.finish(req, "cancelled", now)

    def fail_stuck(self, now: float, *, max_tokens: int, max_seqs: int, block_size: int) -> None:
        """Nothing is in flight, nothing arrives and the scheduler added nothing: fail the oldest waiting request,
        with the reason, so that the others can go on. Raise only if there is nothing to fail (a bug)."""
        stuck = next((r for r in self.waiting if r.is_schedulable), None)
        if stuck is None:
            raise RuntimeError(f"no progress possible with {self.unfinished} unfinished requests: "
                               f"running={self.running} waiting={self.waiting}")
        need = stuck.num_remaining
        why = (f"its prompt of {need} tokens does not fit one batch (batch.max_tokens={max_tokens}) and the "
               "scheduler does not split prefills (chunked_prefill: false)") if need > max_tokens else (
               f"the scheduler never scheduled it although nothing else was running ({need} tokens to prefill, "
               f"batch.max_tokens={max_tokens}, max_seqs={max_seqs}, {self.blocks.num_free} free KV blocks of "
               f"{block_size} tokens)")
        self.finish(stuck, "error", now, error=f"request {stuck.request_id!r} cannot be scheduled: {why}")

    def apply_token(self, entry: BatchEntry, token: int, now: float) -> TokenEvent | None:
        """Deliver one sampled token to its request (or drop it if the request already ended). Its `TokenEvent`
        comes back only while `token_events` is on (a run without `on_token` skips building one per token)."""
        req = entry.req
        req.num_pending -= 1
        if req.status is Status.FINISHED:  # stopped or cancelled earlier: later in-flight tokens are dropped
            return None
        req.tokens.append(token)
        req.token_times.append(now)
        index = req.num_output - 1
        reason: FinishReason | None = None
        if token in req.stop_ids:
            reason = "stop"
        elif req.num_output >= req.max_new_tokens or len(req.tokens) >= req.max_len:
            reason = "length"
        if reason is not None:
            self.finish(req, reason, now)
        return TokenEvent(req.request_id, token, index, now, reason) if self.token_events else None

    def results(self) -> list[Output]:
        return [self.outputs[i] for i in sorted(self.outputs)]

    def check_released(self) -> None:
        """At the end of a run every block and row must be back (a leak check, cheap)."""
        if self.blocks.num_owned or self.rows.num_owned:
            raise AssertionError(f"leak: blocks owned {self.blocks.owners()}, rows owned {self.rows.owners()}")


def _victim(scheduler: Any, running: list[RequestState]) -> RequestState:
    """The scheduler's choice, checked: a plugin's `preemption_victim` must return one of the requests it was given
    (anything else would corrupt the book several calls later, far from the cause)."""
    victim = scheduler.preemption_victim(running)
    if not any(victim is r for r in running):
        raise StrategyError(f"scheduler {type(scheduler).__name__}: preemption_victim returned {victim!r}, not one "
                            f"of the {len(running)} running requests it was given")
    return victim
