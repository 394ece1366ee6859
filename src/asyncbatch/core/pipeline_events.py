"""What the step loop orders, by name: each batch in flight carries the events of its ops (`InFlight`), every
ordering between two ops has a name (`EDGES`; docs/concepts.md has the table and why each exists), tests switch
orderings off by that name (`PipelineDebug`), and an op waits on each distinct event once (`distinct_waits`).

The loop in `pipeline.py` enforces the edges. These are plain values, so that tests, the testing kit and the race
report can name edges without the loop; `pipeline` re-exports them.
"""

from __future__ import annotations

import attrs

from .layout import StepShape
from .runtime.base import Event
from .scheduling import BatchEntry

EDGES: tuple[str, ...] = (
    "h2d->comp", "comp->d2h", "d2h->upd", "comp->comp", "h2d->prep",
    "comp->h2d", "d2h->comp", "upd->d2h", "reuse", "pool", "cached",
)


@attrs.frozen
class PipelineDebug:
    """Test-only switches that break the pipeline on purpose, to prove the invariant tests can fail.

    `disabled_edges` drops event edges by name (`EDGES`). `split_launch` issues d2h[k] only after upd[k-S] (the
    host then runs S batches ahead), a loop shape in which no slot edge is implied by another. `unshared_release`
    breaks the prefix cache's `last use by every holder -> reuse` rule: the first holder to release a shared block
    lets it go for all of them (`kv_blocks.KVBlocks.share_safely`).
    """

    disabled_edges: frozenset = frozenset()
    split_launch: bool = False
    unshared_release: bool = False


@attrs.define(eq=False)
class InFlight:
    """One batch from its prep to its update: what prep planned, the events of its ops, and its host timings."""

    batch: int
    slot: int
    entries: list[BatchEntry]
    shape: StepShape
    accesses: list
    uses_graph: bool
    schedule_s: float
    prepare_s: float
    wait_s: float
    h2d: Event | None = None
    comp: Event | None = None
    d2h: Event | None = None
    launch_s: float = 0.0
    replayed: bool = False
    fresh: bool = False  # the host read every in-flight token before planning it (the scheduler asked)


def distinct_waits(events: list[Event | None]) -> list[Event]:
    """The events an op waits on, each op once. A None is an edge switched off (`PipelineDebug`) or one an
    older wait already implies (`Pipeline._comp_event`)."""
    seen: dict[int, Event] = {}
    for e in events:
        if e is not None:
            seen[e.op_id] = e
    return list(seen.values())
