"""Which CPUs the step loop and everything else of `asyncbatch serve` may run on (`engine.serve.cpu_pinning`).

With the front end in a process of its own, the step loop's host work per step (about 0.7 ms on an 8B model at
batch 32) shares the machine with the front end's (1-3 ms of CPU per step at full load) and with the engine
process's other threads. Left to the kernel, they land on any CPU, including the other hardware thread of the step
loop's core, which then runs the loop's Python at a fraction of its speed. `auto` gives the step loop one physical
core, every hardware thread of it, and keeps the front end and every other thread of the engine's process off it.

The core given is the one holding the highest-numbered CPU the process may use: CPU 0 takes most of the machine's
housekeeping and device interrupts. Linux only (`sched_setaffinity` per thread, the topology under `/sys`), and
only where at least `MIN_CPUS` CPUs are allowed, so the rest keeps at least two for the front end; anywhere else
`auto` leaves placement to the kernel and says why.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import attrs

log = logging.getLogger("asyncbatch")
MIN_CPUS = 4
_SYS_CPU = Path("/sys/devices/system/cpu")


@attrs.frozen
class CpuPlan:
    """`loop`: the CPUs (one core's hardware threads) the step loop runs on; `rest`: everything else's."""

    loop: frozenset[int]
    rest: frozenset[int]

    def describe(self) -> str:
        return f"the step loop on CPU {_ranges(self.loop)}, everything else on CPU {_ranges(self.rest)}"


def parse_cpu_list(text: str) -> frozenset[int]:
    """The kernel's CPU list format: ``"3,11"``, ``"0-3,8-11"``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


def plan_cpus(allowed: frozenset[int], siblings: dict[int, frozenset[int]]) -> CpuPlan | str:
    """The plan for a process allowed on `allowed`, whose CPU c shares a core with `siblings[c]` (c included); a
    string saying why there is none."""
    if len(allowed) < MIN_CPUS:
        return f"only {len(allowed)} CPUs allowed (pinning needs at least {MIN_CPUS})"
    core = siblings.get(max(allowed), frozenset({max(allowed)})) & allowed
    rest = allowed - core
    if len(rest) < 2:
        return f"the step loop's core would leave {len(rest)} CPU for everything else"
    return CpuPlan(loop=core, rest=rest)


def machine_plan() -> CpuPlan | str:
    """`plan_cpus` for this process on this machine."""
    if not sys.platform.startswith("linux"):
        return f"CPU pinning needs Linux (this is {sys.platform})"
    allowed = frozenset(os.sched_getaffinity(0))
    siblings = {}
    for cpu in allowed:
        try:
            siblings[cpu] = parse_cpu_list((_SYS_CPU / f"cpu{cpu}/topology/thread_siblings_list").read_text())
        except (OSError, ValueError):
            siblings[cpu] = frozenset({cpu})  # no topology (some containers): each CPU its own core
    return plan_cpus(allowed, siblings)


def pin_engine_process(plan: CpuPlan) -> None:
    """Called on the step loop's thread just before the loop starts: that thread goes to `plan.loop`, every other
    thread of the process to `plan.rest`. A thread the step loop's thread starts later inherits `loop`: a thread of
    ours calls `pin_this_thread(plan.rest)` first, and `move_strays` moves the ones a library starts (a thread pool
    created on first use)."""
    me = threading.get_native_id()
    for tid in _threads():
        _set(tid, plan.loop if tid == me else plan.rest)
    log.info("CPU pinning: %s", plan.describe())


def move_strays(plan: CpuPlan) -> int:
    """Move every thread but the caller (the step loop's) that sits on `plan.loop` to `plan.rest`; how many."""
    me, moved = threading.get_native_id(), 0
    for tid in _threads():
        if tid != me and _get(tid) == plan.loop:
            moved += _set(tid, plan.rest)
    return moved


def _threads() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/task")]


def _get(tid: int) -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except (ProcessLookupError, PermissionError):
        return None


def _set(tid: int, cpus: frozenset[int]) -> bool:
    try:
        os.sched_setaffinity(tid, cpus)
        return True
    except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
        return False


def pin_this_thread(cpus: frozenset[int]) -> None:
    """The calling thread (and the threads it starts) on `cpus` only."""
    os.sched_setaffinity(0, cpus)


def _ranges(cpus: frozenset[int]) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(run)
            run = []
        run.append(c)
    if run:
        out.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)
