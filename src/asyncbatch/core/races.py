"""Races as a result: what the `sim` runtime's happens-before checker found, said as the missing ordering.

Each conflict becomes a `RacePair`: the two ops in the order the design needs them ("X must happen before Y"),
the resource in words, and, where the pair is one the pipeline's event table (`pipeline_events.EDGES`)
guards, that edge's name. `RaceReport` aggregates them for results.json and for people; `RaceError` fails a
run with it.

Op and edge names are plain strings here: this module sits below the pipeline and imports none of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from .errors import AsyncBatchError
from .runtime.hb import Conflict, NodeInfo

#: Pairs in one batch, first op before second: the edge between them.
SAME_BATCH_EDGES: dict[tuple[str, str, str], str] = {
    ("h2d", "comp", "dev_in"): "h2d->comp",
    ("comp", "d2h", "dev_out"): "comp->d2h",
    ("d2h", "upd", "host_out"): "d2h->upd",
}
#: Pairs across batches, op of the older batch first. The direct pairs are the four slot-reuse edges; a
#: write/write (or a write meeting a later reader) on a slot buffer is closed by the same edge, which orders
#: the older batch's last use of the buffer before the newer batch's first write. Per-request resources
#: (`kv`, `row`) are told apart by owner in `missing_edge`.
CROSS_BATCH_EDGES: dict[tuple[str, str, str], str] = {
    ("h2d", "prep", "host_in"): "h2d->prep",
    ("comp", "h2d", "dev_in"): "comp->h2d",
    ("h2d", "h2d", "dev_in"): "comp->h2d",
    ("h2d", "comp", "dev_in"): "comp->h2d",
    ("d2h", "comp", "dev_out"): "d2h->comp",
    ("comp", "comp", "dev_out"): "d2h->comp",
    ("comp", "d2h", "dev_out"): "d2h->comp",
    ("upd", "d2h", "host_out"): "upd->d2h",
    ("d2h", "d2h", "host_out"): "upd->d2h",
    ("d2h", "upd", "host_out"): "upd->d2h",
    ("comp", "comp", "graph_pool"): "pool",
    ("comp", "comp", "stage"): "pool",
}
PER_REQUEST = ("kv", "row")
MODES = {"r": "read", "w": "write"}
LISTED_PAIRS = 50  # pairs written out in full; counts stay exact


@attrs.frozen
class OpRef:
    name: str
    batch: int
    track: str

    @classmethod
    def of(cls, info: NodeInfo) -> OpRef:
        return cls(info.name, info.batch, info.track)

    def label(self) -> str:
        return f"{self.name}[{self.batch}]" if self.batch >= 0 else self.name


@attrs.frozen
class RacePair:
    """One unordered conflict. `before`/`after` are in the order the design needs (older batch first;
    program order within one batch). `edge` is the `pipeline_events.EDGES` name that orders them, None where
    none does (plugin ops; or `same_op`: one op touching a per-request resource for two owners, which no edge
    can fix)."""

    before: OpRef
    after: OpRef
    resource: str
    kind: str
    modes: tuple[str, str]
    owners: tuple[Any, Any] | None
    edge: str | None
    same_op: bool = False

    def ordering(self) -> str:
        if self.same_op:
            return (f"{self.before.label()} touches {self.resource} for two owners at once: nothing orders "
                    "accesses inside one op (an allocation error, not a missing edge)")
        text = f"{self.before.label()} must happen before {self.after.label()}"
        if self.edge is None:
            return text
        if "->" not in self.edge or self.edge == f"{self.before.name}->{self.after.name}":
            return f"{text} (edge {self.edge})"
        # A pair the edge orders through a chain (a write/write on a slot buffer): name the edge's own ops.
        first, second = self.edge.split("->")
        return f"{text} (edge {self.edge}: {first}[{self.before.batch}] -> {second}[{self.after.batch}])"

    def __str__(self) -> str:
        who = "" if self.owners is None else f" (owners {self.owners[0]!r}, {self.owners[1]!r})"
        a, b = self.before, self.after
        return (f"unordered {'/'.join(self.modes)} on {self.resource}: {a.label()}@{a.track} vs "
                f"{b.label()}@{b.track}{who}; {self.ordering()}")

    def to_dict(self) -> dict[str, Any]:
        return {"before": attrs.asdict(self.before), "after": attrs.asdict(self.after),
                "resource": self.resource, "kind": self.kind, "modes": list(self.modes),
                "owners": None if self.owners is None else [_plain(o) for o in self.owners],
                "missing_edge": self.edge, "ordering": self.ordering()}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def resource_kind(resource: Any) -> str:
    if isinstance(resource, tuple) and resource and isinstance(resource[0], str):
        return resource[0]
    return type(resource).__name__


def describe_resource(resource: Any) -> str:
    """`("dev_in", 1)` -> `dev_in[slot 1]`, `("kv", 17)` -> `kv block 17`, `("row", 3)` -> `row 3`."""
    kind = resource_kind(resource)
    rest = resource[1:] if isinstance(resource, tuple) else ()
    if kind in ("host_in", "dev_in", "dev_out", "host_out") and len(rest) == 1:
        return f"{kind}[slot {rest[0]}]"
    if kind == "kv" and len(rest) == 1:
        return f"kv block {rest[0]}"
    if kind == "row" and len(rest) == 1:
        return f"row {rest[0]}"
    if kind in ("graph_pool", "stage") and not rest:
        return {"graph_pool": "the shared graph pool", "stage": "the staging buffers"}[kind]
    if rest:
        return f"{kind}[{', '.join(map(str, rest))}]"
    return kind if isinstance(resource, tuple) else repr(resource)


def missing_edge(before: str, after: str, kind: str, *, same_batch: bool,
                 same_owner: bool | None, modes: tuple[str, str] = ("w", "w")) -> str | None:
    """The `pipeline_events.EDGES` name that orders op `before` ahead of op `after` on a `kind` resource, or None."""
    if same_batch:
        return SAME_BATCH_EDGES.get((before, after, kind))
    if kind in PER_REQUEST and (before, after) == ("comp", "comp"):
        # The same request's previous batch is `comp->comp`; another request reading a block that one wrote is a
        # prefix-cache hit (`cached`); a block or row handed to a new owner is `reuse`.
        if same_owner:
            return "comp->comp"
        return "cached" if kind == "kv" and modes == ("w", "r") else "reuse"
    return CROSS_BATCH_EDGES.get((before, after, kind))


def pair_of(conflict: Conflict) -> RacePair:
    a, b = conflict.first, conflict.second
    modes = (conflict.first_mode, conflict.second_mode)
    # The checker names them in issue order; the design's order is older batch first (the host may issue the
    # newer batch's op first, e.g. d2h[k] before upd[k-1]).
    if a.batch >= 0 and b.batch >= 0 and b.batch < a.batch:
        a, b, modes = b, a, modes[::-1]
    owners = None if conflict.owners == (None, None) else tuple(conflict.owners)
    if owners is not None and (a, b) != (conflict.first, conflict.second):
        owners = owners[::-1]
    kind = resource_kind(conflict.resource)
    edge = None
    if a.node_id != b.node_id:
        edge = missing_edge(a.name, b.name, kind, same_batch=a.batch == b.batch,
                            same_owner=None if owners is None else owners[0] == owners[1], modes=modes)
    return RacePair(OpRef.of(a), OpRef.of(b), describe_resource(conflict.resource), kind,
                    (MODES.get(modes[0], modes[0]), MODES.get(modes[1], modes[1])), owners, edge,
                    same_op=a.node_id == b.node_id)


@attrs.frozen
class RaceReport:
    """Every unordered conflict of one checked run. Falsey when there is none."""

    pairs: tuple[RacePair, ...] = ()

    @classmethod
    def from_conflicts(cls, conflicts: Sequence[Conflict]) -> RaceReport:
        return cls(tuple(pair_of(c) for c in conflicts))

    @property
    def count(self) -> int:
        return len(self.pairs)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.pairs).most_common())

    def by_edge(self) -> dict[str, int]:
        """Per missing edge; pairs no edge of the table orders count under "(none)"."""
        return dict(Counter(p.edge or "(none)" for p in self.pairs).most_common())

    def edges(self) -> frozenset[str]:
        return frozenset(p.edge for p in self.pairs if p.edge is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"checked": True, "count": self.count, "by_resource": self.by_kind(),
                "by_missing_edge": self.by_edge(), "pairs": [p.to_dict() for p in self.pairs[:LISTED_PAIRS]],
                "pairs_left_out": max(0, self.count - LISTED_PAIRS)}

    def __str__(self) -> str:
        if not self.pairs:
            return "no races: every conflicting access was ordered"
        lines = [f"{self.count} race(s): unordered conflicting accesses found by the sim runtime's checker",
                 "  missing edges: " + ", ".join(f"{k} {v}" for k, v in self.by_edge().items()),
                 "  resources: " + ", ".join(f"{k} {v}" for k, v in self.by_kind().items())]
        lines += [f"  - {p}" for p in self.pairs[:5]]
        if self.count > 5:
            lines.append(f"  ... and {self.count - 5} more")
        return "\n".join(lines)


class RaceError(AsyncBatchError, RuntimeError):
    """A checked run had unordered conflicting accesses. `report` lists them; `result` is the run's result
    where the run completed; `__cause__` is what failed where it did not (most likely on data the race
    corrupted)."""

    def __init__(self, report: RaceReport, *, cause: BaseException | None = None, result: Any = None) -> None:
        self.report = report
        self.result = result
        first = report.pairs[0] if report.pairs else None
        edge = next((p.edge for p in report.pairs if p.edge is not None), None)
        text = f"{report.count} race(s) in the pipeline (unordered conflicting accesses)"
        if first is not None:
            text += f"; first: {first}"
        if edge is not None and (first is None or first.edge != edge):
            text += f"; first missing edge: {edge}"
        if cause is not None:
            text = (f"the run failed with {type(cause).__name__}: {cause}; the race most likely corrupted "
                    f"its data and caused it. {text}")
        super().__init__(text)


def race_report(runtime: Any) -> RaceReport | None:
    """The races `runtime` recorded in its last run: None where it does not check (`tracks_accesses` off, or a
    sim runtime with `check: false`), an empty (falsey) report where it checked and found none."""
    if not getattr(runtime, "tracks_accesses", False):
        return None
    if getattr(getattr(runtime, "config", None), "check", True) is False:
        return None
    conflicts = getattr(runtime, "conflicts", None)
    return None if conflicts is None else RaceReport.from_conflicts(conflicts)


def raise_if_racy(runtime: Any, exc: BaseException | None = None, *, result: Any = None) -> RaceReport | None:
    """After a run: raise `RaceError` where `runtime` recorded a race, chained from `exc` where the run
    failed with it. Returns the report otherwise (None where unchecked), and leaves re-raising a race-free
    `exc` (or an interrupt, which is never wrapped) to the caller. A `RaceError` already raised (by the sim
    runtime, when an op fails after a race) is raised again unchanged."""
    if isinstance(exc, RaceError):
        raise exc
    report = race_report(runtime)
    if not report or (exc is not None and not isinstance(exc, Exception)):
        return report
    if exc is not None:
        raise RaceError(report, cause=exc, result=result) from exc
    raise RaceError(report, result=result)
