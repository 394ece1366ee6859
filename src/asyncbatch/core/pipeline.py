"""The step loop, written once for every combination of strategies.

For batch k in slot s = k mod S:  prep[k] (host) -> h2d[k] -> comp[k] -> d2h[k] -> upd[k] (host).
The host runs `prep[k]; launch[k]; upd[k-S+1]`, so up to S-1 batches are in flight while it prepares the next.
Every ordering between ops is a declared event, enforced here; the edges' names (`EDGES`) and a batch's record are
in `pipeline_events.py`, slot buffers and the warm-up in `pipeline_setup.py`. docs/concepts.md has the edge table.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from .book import RequestBook
from .config import BatchConfig
from .interfaces import AttentionBackend, BufferPolicy, GraphPolicy, Scheduler, StreamTopology
from .layout import HostBatchWriter, SlotLayout, StepShape
from .pipeline_events import EDGES, InFlight, PipelineDebug, distinct_waits
from .pipeline_setup import build_slots, warm_up
from .runtime.base import Event, Runtime
from .scheduling import BatchEntry, PendingView
from .shapes import StepShapes
from .stats import StepStats
from .step import StepBody

__all__ = ["EDGES", "Pipeline", "PipelineDebug"]  # tests, the testing kit and the engine import the edges from here


class Pipeline:
    """Owns slots, streams and the loop; composed by the engine from strategy instances."""

    def __init__(self, *, runtime: Runtime, topology: StreamTopology, buffers: BufferPolicy, graphs: GraphPolicy,
                 scheduler: Scheduler, backend: AttentionBackend, body: StepBody, layout: SlotLayout,
                 writer: HostBatchWriter, batch: BatchConfig, block_size: int,
                 debug: PipelineDebug = PipelineDebug()) -> None:
        self.rt = runtime
        self.topology = topology
        self.num_slots = buffers.num_slots
        self.buffers = buffers
        self.graphs = graphs
        self.scheduler = scheduler
        # Building the view costs host time every step: only for schedulers that override the question.
        self._asks_fresh = type(scheduler).needs_fresh_tokens is not Scheduler.needs_fresh_tokens
        self.backend = backend
        self.layout = layout
        self.writer = writer
        self.batch_cfg = batch
        self.block_size = block_size
        self.shapes = StepShapes(batch, layout, backend, block_size)
        self.debug = debug
        runtime.setup_streams(topology.streams)
        self.stream = {role: topology.stream_for(role) for role in ("h2d", "compute", "d2h")}
        self.slots, self.graph_ctx = build_slots(runtime, self.num_slots, layout, body,
                                                 compute_stream=self.stream["compute"],
                                                 static_mixed=backend.has_static_launch)
        graphs.bind(self.graph_ctx)
        self._events: dict[int, InFlight] = {}
        self._last_pool: Event | None = None
        self._start = 0.0

    # ------------------------------------------------------------------ loop
    def run(self, book: RequestBook, *, on_token: Callable | None = None,
            on_step: Callable[[StepStats], None] | None = None, keep_steps: bool = True) -> list[StepStats]:
        """Serve `book` until no request is unfinished and the book expects no more (`wait_for_arrivals`). Returns
        every step's stats; `keep_steps=False` returns none (a serving run lasts for days: `on_step` sees them)."""
        S = self.num_slots
        keep = S - 1
        inflight: deque[InFlight] = deque()
        steps: list[StepStats] = []
        book.token_events = on_token is not None  # nobody streams: no event object per token
        self._events.clear()
        self._last_pool = None
        k = 0

        def update_oldest() -> None:
            stats = self._update(inflight.popleft(), book, on_token, on_step)
            if keep_steps:
                steps.append(stats)

        self._start = self.rt.now()
        while book.unfinished or _settle_and_wait(book, inflight, update_oldest):
            fresh = bool(inflight) and self._asks_fresh and self.scheduler.needs_fresh_tokens(
                PendingView(k, len(inflight), tuple(book.schedulable()[0])))
            if fresh:  # the scheduler must see every token: give up this step's overlap
                while inflight:
                    update_oldest()
            now = self.rt.now()
            book.admit_arrivals(now)
            book.apply_cancellations(now)
            rec = self._prepare(k, book, len(inflight), fresh)
            if rec is None:
                if inflight:
                    update_oldest()
                elif not book.unfinished:
                    continue  # cancellations ended the last requests
                elif book.next_arrival() is not None:
                    self.rt.idle_until(book.next_arrival())
                elif not book.break_deadlock(self.scheduler):
                    # Nothing runs and the scheduler added nothing: the oldest waiting request can never be
                    # scheduled. It fails with the reason; everyone else goes on.
                    book.fail_stuck(now, max_tokens=self.batch_cfg.max_tokens, max_seqs=self.layout.max_seqs,
                                    block_size=self.block_size)
                continue
            self._launch(rec, inflight, keep, update_oldest)
            k += 1
        while inflight:
            update_oldest()
        self.rt.synchronize()
        return steps

    # ------------------------------------------------------------------ prep
    def _prepare(self, k: int, book: RequestBook, in_flight: int, fresh: bool) -> InFlight | None:
        s = self.buffers.slot_for(k)
        # Host phases are timed on the host clock: the device's work a runtime does on this thread (the sim runs
        # ops on entering a phase) counts as waiting, so host times do not depend on where the ops ran.
        clock = self.rt.host_clock
        t0 = time.perf_counter()
        prev = self._events.get(k - self.num_slots)
        if prev is not None and "h2d->prep" not in self.debug.disabled_edges:
            self.rt.host_wait(prev.h2d, reason="h2d[k-S] -> prep[k]")
        t1 = clock()
        tracks = self.rt.tracks_accesses
        with self.rt.host_phase("prep", batch=k, accesses=[(("host_in", s), "w", None)] if tracks else ()):
            entries = book.plan(self.scheduler, k, max_tokens=self.batch_cfg.max_tokens, max_seqs=self.layout.max_seqs,
                                block_size=self.block_size, in_flight=in_flight).entries
            if not entries:
                return None
            t2 = clock()
            writer = self.writer
            for e in entries:
                req = e.req
                if e.admitted:
                    p = req.params
                    writer.bind_row(e.row, p.temperature, p.top_k, p.top_p, req.seed)
                if e.new_blocks:
                    writer.add_blocks(e.row, len(req.blocks) - len(e.new_blocks), e.new_blocks)
            shape = self.shapes.of(entries)
            uses_graph = self.graphs.uses_graph(shape)
            accesses = self._comp_accesses(s, entries, uses_graph) if tracks else []
            writer.write(self.slots[s].host_in, entries, shape)
            book.on_scheduled(entries, k)
        t3 = clock()
        return InFlight(k, s, entries, shape, accesses, uses_graph, schedule_s=t2 - t1, prepare_s=t3 - t2,
                        wait_s=time.perf_counter() - t0 - (t3 - t1), fresh=fresh)

    def step_shapes(self, modes: Sequence[str]) -> tuple[list[StepShape], bool]:
        """Every shape a step with sampling path in `modes` can take, and whether that list is complete
        (`StepShapes.enumerate`)."""
        return self.shapes.enumerate(modes)

    def _comp_accesses(self, s: int, entries: list[BatchEntry], uses_graph: bool) -> list:
        bs = self.block_size
        acc: list = [(("dev_in", s), "r", None), (("dev_out", s), "w", None)]
        for e in entries:
            rid = e.req.request_id
            if e.carries:
                acc.append((("row", e.row), "r", rid))
            if e.samples:
                acc.append((("row", e.row), "w", rid))
            first_written = e.start // bs
            last = -(-(e.start + e.num_tokens) // bs)
            for i, b in enumerate(e.req.blocks[:last]):
                acc.append((("kv", b), "w" if i >= first_written else "r", rid))
        if uses_graph:
            acc.extend((res, mode, None) for res, mode in self.graphs.resources(s))
        return acc

    # ------------------------------------------------------------------ launch
    def _launch(self, rec: InFlight, inflight: deque, keep: int, update_oldest: Callable[[], None]) -> None:
        rt, k, s = self.rt, rec.batch, rec.slot
        off = self.debug.disabled_edges
        slot = self.slots[s]
        prev = self._events.get(k - self.num_slots)
        tracks = rt.tracks_accesses
        t0, h0 = time.perf_counter(), rt.host_clock()

        def launched() -> None:  # host work only (`_prepare`); the rest of the real time was the device's
            rec.launch_s = rt.host_clock() - h0
            rec.wait_s += time.perf_counter() - t0 - rec.launch_s

        def h2d() -> None:
            slot.device.inputs.copy_(slot.host_in, non_blocking=True)

        rec.h2d = rt.launch("h2d", self.stream["h2d"], h2d,
                            waits=[prev.comp if prev and "comp->h2d" not in off else None],
                            accesses=[(("host_in", s), "r", None), (("dev_in", s), "w", None)] if tracks else (),
                            batch=k)
        waits = [rec.h2d if "h2d->comp" not in off else None,
                 prev.d2h if prev and "d2h->comp" not in off else None]
        if "comp->comp" not in off:
            waits.extend(self._comp_event(e.prev_batch) for e in rec.entries)
        if "reuse" not in off:
            waits.extend(self._comp_event(m) for e in rec.entries for m in e.reuse_after)
        if "cached" not in off:  # a prefix-cache hit reads blocks another request's batch computed
            waits.extend(self._comp_event(m) for e in rec.entries for m in e.reads_after)
        if rec.uses_graph and "pool" not in off:
            waits.append(self._last_pool)
        graphs, shape = self.graphs, rec.shape

        def comp() -> None:
            rec.replayed = graphs.run(s, shape)

        info = {"tokens": shape.tokens, "graph": rec.uses_graph}
        if tracks:  # a checking runtime (`sim`) compares the plans of ranks that meet in a step (`sim_group`)
            info["plan"] = tuple((e.req.request_id, e.start, e.num_tokens) for e in rec.entries)
        rec.comp = rt.launch("comp", self.stream["compute"], comp, waits=distinct_waits(waits),
                             accesses=rec.accesses, batch=k, info=info)
        if rec.uses_graph:
            self._last_pool = rec.comp
        self._events[k] = rec
        self._events.pop(k - 2 * self.num_slots - 2, None)

        def d2h() -> None:
            slot.host_out.copy_(slot.device.outputs, non_blocking=True)

        def launch_d2h() -> None:
            rec.d2h = rt.launch("d2h", self.stream["d2h"], d2h,
                                waits=[rec.comp if "comp->d2h" not in off else None],
                                accesses=[(("dev_out", s), "r", None), (("host_out", s), "w", None)] if tracks else (),
                                batch=k)
            inflight.append(rec)

        if self.debug.split_launch:
            if "upd->d2h" in off:
                launch_d2h()
                launched()
                while len(inflight) > keep + 1:
                    update_oldest()
            else:
                launched()
                while len(inflight) > keep:
                    update_oldest()
                launch_d2h()
            return
        launch_d2h()
        launched()
        while len(inflight) > keep:
            update_oldest()

    def _comp_event(self, batch: int) -> Event | None:
        # Batches older than the retained window were updated by the host before this prep, which waited on
        # their d2h (itself after their comp): the order is already implied.
        rec = self._events.get(batch) if batch >= 0 else None
        return rec.comp if rec is not None else None

    # ------------------------------------------------------------------ update
    def _update(self, rec: InFlight, book: RequestBook, on_token: Callable | None,
                on_step: Callable[[StepStats], None] | None) -> StepStats:
        rt = self.rt
        t0 = time.perf_counter()
        if "d2h->upd" not in self.debug.disabled_edges:
            rt.host_wait(rec.d2h, reason="d2h[k] -> upd[k]")
        t1 = rt.host_clock()  # host work on the host clock (`_prepare`)
        s = rec.slot
        with rt.host_phase("upd", batch=rec.batch,
                           accesses=[(("host_out", s), "r", None)] if rt.tracks_accesses else ()):
            tokens = self.slots[s].host_out[: len(rec.entries)].tolist()
            now = rt.now()
            for e, tok in zip(rec.entries, tokens):
                if e.samples:
                    event = book.apply_token(e, tok, now)
                    if event is not None and on_token is not None:
                        on_token(event)
        t2 = rt.host_clock()
        waited = time.perf_counter() - t0 - (t2 - t1)
        stats = StepStats(
            batch=rec.batch, slot=s, num_seqs=len(rec.entries), num_tokens=sum(e.num_tokens for e in rec.entries),
            num_decode=sum(1 for e in rec.entries if e.num_tokens == 1 and e.start > 0),
            padded_tokens=rec.shape.tokens, graph_replay=rec.replayed, schedule_s=rec.schedule_s,
            prepare_s=rec.prepare_s, launch_s=rec.launch_s, wait_s=rec.wait_s + waited, update_s=t2 - t1,
            compute_s=rt.op_seconds(rec.comp), num_context=sum(e.start + e.num_tokens for e in rec.entries),
            time_s=rt.now() - self._start, fresh_tokens=rec.fresh)
        if on_step is not None:
            on_step(stats)
        return stats

    # ------------------------------------------------------------------ warm-up
    def warmup(self, shapes: list[StepShape], *, on_shape: Callable[[], None] | None = None) -> int:
        """Run (and so capture, under a graph policy) each shape on padding-only inputs in every slot, largest
        first so that the shared pool is sized once. `on_shape` is called after each (progress bars)."""
        return warm_up(self.rt, self.stream, self.slots, self.writer, self.graphs, shapes, on_shape=on_shape)


def _settle_and_wait(book: RequestBook, inflight: deque, update_oldest: Callable[[], None]) -> bool:
    """Nothing is unfinished: update the batches still in flight (their tokens belong to ended requests and are
    dropped), so that an idle loop holds no batch, then ask the book for more requests. False ends the run."""
    while inflight:
        update_oldest()
    return book.wait_for_arrivals()
