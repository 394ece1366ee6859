"""The `sim` runtime: records ops, executes them later in any order their declared dependencies allow.

Real tensors flow (on the CPU), so a missing dependency shows up twice: as a conflict reported by the
happens-before checker, naming the ops, streams and buffer, and as wrong tokens. With a cost model it also keeps
virtual time, so a pipeline's GPU busy fraction can be studied without a GPU.

Host time comes from the cost model (`host: model`) or is measured (`host: measured`): the real time the
host spends outside this runtime, times `host_scale`; never the time spent in here (running ops, checking).
That time counts in `emulation_s`, so the step loop's real host timings leave it out too, wherever the buffer
policy makes the ops run (in a wait, a launch or on entering a host phase).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

from ..races import raise_if_racy
from .base import Access, Event, ImmediateGraph, Runtime, Span
from .hb import HappensBefore
from .sim_config import Chooser, CostModel, RandomChooser, SimRuntimeConfig

__all__ = ["Chooser", "CostModel", "RandomChooser", "SimRuntime", "SimRuntimeConfig"]


@attrs.define(eq=False)
class _Op:
    node: int
    name: str
    stream: str
    fn: Callable[[], None]
    preds: tuple[int, ...]
    issue_time: float
    batch: int
    info: dict
    done: bool = False
    start: float = 0.0
    end: float = 0.0


class SimRuntime(Runtime):
    """Deferred, reorderable execution with a happens-before checker and virtual time."""

    name = "sim"
    Config = SimRuntimeConfig
    is_asynchronous = True
    graph_support = "emulated"
    tracks_accesses = True

    def __init__(self, config: SimRuntimeConfig | None = None, *, device: str = "cpu",
                 chooser: Chooser | None = None) -> None:
        super().__init__()
        import torch

        self.config = config or SimRuntimeConfig()
        # Accesses are costly to build and only the checker reads them.
        self.tracks_accesses = self.config.check
        self._device = torch.device(device)
        self.chooser: Chooser = chooser or RandomChooser(self.config.seed)
        self._group: Any = None  # a `SimGroup` this rank's compute ops meet the other ranks' in (`join`)
        self._rank = 0
        self._meetings = 0  # compute ops run so far in the group: never reset, every rank counts the same ones
        self.reset()

    def join(self, group: Any, rank: int) -> None:
        """Make this runtime rank `rank` of `group` (a `SimGroup`): from now on its compute ops run in the order
        they were issued, and each starts only once every rank has reached its own (see `sim_group`)."""
        self._group, self._rank = group, rank

    def reset(self) -> None:
        self.hb = HappensBefore()
        self._ops: dict[int, _Op] = {}
        self._pending: list[_Op] = []
        self._last_on_stream: dict[str, int] = {}
        self._stream_free: dict[str, float] = {}
        self._host_cursor = self.hb.add_node("start", "host", -1, [])
        self._host_time = 0.0
        self.spans = []
        self.executed: list[tuple[str, int]] = []
        self._mark = time.perf_counter()

    def _charge_host(self) -> float:
        """Measured mode: the real time since the host last left this runtime was host work; charge it. Returns
        when the host entered (for `_leave`)."""
        t = time.perf_counter()
        if self.config.host == "measured":
            self._host_time += (t - self._mark) * 1e3 * self.config.host_scale  # virtual ms
            self._mark = t
        return t

    def _leave(self, entered: float) -> None:
        """The host leaves this runtime: the time spent in here (running ops, checking) was the device's work,
        whichever host call it happened in, so it counts in `emulation_s`, never as host work."""
        self._mark = time.perf_counter()
        self.emulation_s += self._mark - entered

    @property
    def device(self) -> Any:
        return self._device

    @property
    def conflicts(self) -> list:
        return self.hb.conflicts

    # ---- issue
    def launch(self, name: str, stream: str, fn: Callable[[], None], *, waits: Sequence[Event | None] = (),
               accesses: Sequence[Access] = (), batch: int = -1, info: dict | None = None) -> Event:
        info = info or {}
        entered = self._charge_host()
        # Measured or not: this stands for the driver's kernel launches, which the sim never makes.
        self._host_time += self.config.cost.host_ms("launch", info) if name == "comp" else 0.0
        preds = [self._host_cursor, *(e.op_id for e in waits if e is not None)]
        if self.config.fifo_streams and stream in self._last_on_stream:
            preds.append(self._last_on_stream[stream])
        node = self.hb.add_node(name, stream, batch, preds)
        if self.config.check and accesses:
            self.hb.access(node, list(accesses))
        op = _Op(node, name, stream, fn, self.hb.preds[node], self._host_time, batch, info)
        self._ops[node] = op
        self._pending.append(op)
        self._last_on_stream[stream] = node
        self._progress()
        self._leave(entered)
        return Event(node, name, stream, op)

    def host_wait(self, event: Event | None, *, reason: str = "") -> None:
        if event is None:
            return
        entered = self._charge_host()
        target = self._ops.get(event.op_id)
        while target is not None and not target.done:
            self._execute_one()
        self._host_cursor = self.hb.add_node("wait", "host", -1, [self._host_cursor, event.op_id])
        if target is not None:
            self._host_time = max(self._host_time, target.end)
        self._leave(entered)

    @contextmanager
    def host_phase(self, name: str, *, batch: int = -1, accesses: Sequence[Access] = (),
                   info: dict | None = None) -> Iterator[None]:
        entered = self._charge_host()
        self._catch_up()
        node = self.hb.add_node(name, "host", batch, [self._host_cursor])
        self._host_cursor = node
        if self.config.check and accesses:
            self.hb.access(node, list(accesses))
        start = self._host_time
        self._leave(entered)
        yield
        entered = self._charge_host()
        if self.config.host == "model":
            self._host_time += self.config.cost.host_ms(name, info or {})
        self.spans.append(Span("host", name, start / 1e3, self._host_time / 1e3, batch))
        self._progress()
        self._leave(entered)

    def capture(self, fn: Callable[[], None], stream: str) -> ImmediateGraph:
        return ImmediateGraph(fn)

    def synchronize(self) -> None:
        entered = self._charge_host()
        while self._pending:
            self._execute_one()
        self._host_cursor = self.hb.add_node("sync", "host", -1,
                                             [self._host_cursor, *self._last_on_stream.values()])
        ends = [op.end for op in self._ops.values()]
        self._host_time = max([self._host_time, *ends])
        self._leave(entered)

    # ---- execution
    def _ready(self) -> list[_Op]:
        ops = self._ops
        ready = [op for op in self._pending if all(p not in ops or ops[p].done for p in op.preds)]
        if self._group is not None:  # collectives run in issue order, as on one NCCL communicator
            first = min((op.node for op in self._pending if op.name == "comp"), default=None)
            ready = [op for op in ready if op.name != "comp" or op.node == first]
        return ready

    def _progress(self) -> None:
        """Let the device run ahead by a chosen number of ops (random order only)."""
        if self.config.order != "random":
            return
        ready = self._ready()
        steps = self.chooser.choose(len(ready) + 1) if ready else 0
        for _ in range(steps):
            if not self._pending:
                break
            self._execute_one()

    def _catch_up(self) -> None:
        """Timed order: before a host phase touches buffers, run the ops that start by now in virtual time, or
        it sees them as if the device had stalled since issue (`prep[k]` overwriting `host_in` before
        `h2d[k-1]` copied it). Same (start, node) order as the waits: the virtual timeline does not change."""
        while self.config.order == "timed" and (ready := self._ready()):
            op = min(ready, key=self._timed_key)
            start = self._earliest_start(op)
            if self._group is not None and op.name == "comp":  # the host never waits here for other ranks
                start = self._group.arrive(self._rank, self._meetings, self._signature(op), start)
            if start is None or start > self._host_time:
                return
            self._run(op)

    def _timed_key(self, op: _Op) -> tuple[float, int]:
        return self._earliest_start(op), op.node

    def _earliest_start(self, op: _Op) -> float:
        ops = self._ops
        t = max([op.issue_time, *(ops[p].end for p in op.preds if p in ops)])
        return max(t, self._stream_free.get(op.stream, 0.0))

    def _execute_one(self) -> None:
        ready = self._ready()
        if not ready:
            raise RuntimeError("sim deadlock: ops are pending but none is ready "
                               f"({', '.join(f'{o.name}[{o.batch}]' for o in self._pending)})")
        timed = self.config.order == "timed"
        self._run(min(ready, key=self._timed_key) if timed else ready[self.chooser.choose(len(ready))])

    def _signature(self, op: _Op) -> tuple:
        return op.batch, op.info.get("tokens"), op.info.get("plan")

    def _meet(self, op: _Op) -> float:
        """A compute op in a group starts when every rank has reached its own, at the latest rank's time."""
        meeting = self._meetings
        self._group.arrive(self._rank, meeting, self._signature(op), self._earliest_start(op))
        start = self._group.wait(self._rank, meeting)
        self._meetings += 1
        return start

    def _run(self, op: _Op) -> None:
        op.start = self._meet(op) if self._group is not None and op.name == "comp" else self._earliest_start(op)
        op.end = op.start + self.config.cost.op_ms(op.name, op.info)
        self._stream_free[op.stream] = op.end
        try:
            op.fn()
        except Exception as exc:
            raise_if_racy(self, exc)  # after a race, most likely it broke on corrupted data: say so
            raise
        op.done = True
        self._pending.remove(op)
        self.executed.append((op.name, op.batch))
        args = {k: v for k, v in op.info.items() if k != "plan"}  # the plan is for `sim_group`, not the trace
        self.spans.append(Span(op.stream, op.name, op.start / 1e3, op.end / 1e3, op.batch, args))

    # ---- virtual time
    def idle_until(self, t: float) -> None:
        """Virtual time jumps to the next arrival: nothing sleeps."""
        self._charge_host()
        self._host_time = max(self._host_time, t * 1e3)

    def op_seconds(self, event: Event | None) -> float | None:
        op = self._ops.get(event.op_id) if event is not None else None
        return (op.end - op.start) / 1e3 if op is not None and op.done else None

    def now(self) -> float:
        self._charge_host()
        return self._host_time / 1e3

    def compute_busy(self) -> dict[str, float] | None:
        comp = [s for s in self.spans if s.name == "comp"]
        if not comp:
            return None
        busy = sum(s.end - s.start for s in comp)
        span = max(s.end for s in comp) - min(s.start for s in comp)
        return {"busy_s": busy, "span_s": span, "busy_fraction": busy / span if span > 0 else 1.0}

    def reset_timeline(self) -> None:
        self.reset()
