"""A happens-before checker over declared accesses.

Nodes are ops and host phases, numbered in issue order; each names its direct predecessors (the host position at
issue, the events it waits on, and, only where the runtime promises it, the previous op of its stream). Two
accesses to one resource conflict when at least one writes and neither node reaches the other through
predecessors. Two different owners touching one per-request resource inside a single op also conflict: nothing
orders accesses within an op.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import attrs


@attrs.frozen
class NodeInfo:
    node_id: int
    name: str
    track: str
    batch: int

    def describe(self) -> str:
        b = f"[{self.batch}]" if self.batch >= 0 else ""
        return f"{self.name}{b}@{self.track}"


@attrs.frozen
class Conflict:
    """Two accesses to `resource` that no dependency orders."""

    resource: Any
    first: NodeInfo
    first_mode: str
    second: NodeInfo
    second_mode: str
    owners: tuple[Any, Any] = (None, None)

    def __str__(self) -> str:
        kind = {"rw": "read/write", "wr": "write/read", "ww": "write/write"}[self.first_mode + self.second_mode]
        who = "" if self.owners == (None, None) else f" (owners {self.owners[0]!r}, {self.owners[1]!r})"
        return (f"unordered {kind} on {self.resource!r}: {self.first.describe()} vs "
                f"{self.second.describe()}{who}")


class HappensBefore:
    """Records nodes and accesses; `conflicts` lists every unordered conflicting pair found so far."""

    def __init__(self) -> None:
        self.preds: list[tuple[int, ...]] = []
        self.info: list[NodeInfo] = []
        self._accesses: dict[Any, list[tuple[int, str, Any]]] = defaultdict(list)
        self.conflicts: list[Conflict] = []
        self._seen: set[tuple[Any, int, int]] = set()

    def add_node(self, name: str, track: str, batch: int, preds: list[int | None]) -> int:
        node = len(self.preds)
        self.preds.append(tuple(sorted({p for p in preds if p is not None})))
        self.info.append(NodeInfo(node, name, track, batch))
        return node

    def is_before(self, a: int, b: int) -> bool:
        """True if node `a` happens before node `b` (ids are a topological order)."""
        if a >= b:
            return False
        stack, seen = [b], {b}
        preds = self.preds
        while stack:
            for p in preds[stack.pop()]:
                if p == a:
                    return True
                if p > a and p not in seen:
                    seen.add(p)
                    stack.append(p)
        return False

    def access(self, node: int, accesses: list[tuple[Any, str, Any]]) -> None:
        for resource, mode, owner in accesses:
            history = self._accesses[resource]
            for prev_node, prev_mode, prev_owner in history:
                if prev_mode == "r" and mode == "r":
                    continue
                if prev_node == node:
                    unordered = prev_owner != owner
                else:
                    unordered = not self.is_before(prev_node, node)
                if unordered:
                    key = (resource, prev_node, node)
                    if key not in self._seen:
                        self._seen.add(key)
                        self.conflicts.append(Conflict(resource, self.info[prev_node], prev_mode,
                                                       self.info[node], mode, (prev_owner, owner)))
            if mode == "w":
                # Accesses ordered before this write can never conflict with later ones unordered with it
                # without also conflicting with this write: keep only the unordered stragglers.
                keep = [h for h in history if h[0] == node or not self.is_before(h[0], node)]
                keep.append((node, mode, owner))
                self._accesses[resource] = keep
            else:
                history.append((node, mode, owner))
