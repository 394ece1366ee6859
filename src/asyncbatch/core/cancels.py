"""Cancels that may come from any thread, before, during or after the run that holds their request."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

#: How many ended requests' ids the engine remembers. A cancel that arrives for one of them is dropped: a client
#: that cancels after its result came back, then reuses the id, must not lose the next request of that id.
ENDED_IDS_KEPT = 10_000


class Cancels:
    """The engine's cancel box. `attach(book)` when a run starts and `detach()` when it ends, by the running thread;
    `cancel(id)` from any thread.

    A cancel for an id the attached run holds marks it in that run's book. One for the id of a request that ended
    (among the last `kept` ids of runs that ended) is dropped: there is nothing left to cancel. Any other waits
    here, and applies when a run that holds its id attaches its book."""

    def __init__(self, kept: int = ENDED_IDS_KEPT) -> None:
        self._lock = threading.Lock()
        self._book: Any = None
        self._pending: set[str] = set()
        self._kept = kept
        self._ended: OrderedDict[str, None] = OrderedDict()  # in end order: the oldest is forgotten first

    def attach(self, book: Any) -> None:
        with self._lock:
            self._book = book
            for rid in self._pending & book.ids:
                book.cancel(rid)
            self._pending -= book.ids

    def detach(self) -> None:
        with self._lock:
            book, self._book = self._book, None
            if book is not None:
                self._remember(ended_ids(book))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if self._book is not None and self._book.cancel(request_id):
                return
            if request_id not in self._ended:
                self._pending.add(request_id)

    def forget(self, request_ids: Any) -> None:
        """Drop waiting cancels for `request_ids`: the run they were meant for is over, so they must not cancel a
        later run's request that reuses an id (even one whose end is no longer remembered)."""
        with self._lock:
            self._pending.difference_update(request_ids)

    def _remember(self, ids: Sequence[str]) -> None:
        for rid in ids[-self._kept:] if self._kept else ():
            self._ended[rid] = None
            self._ended.move_to_end(rid)  # a reused id counts from its latest end
        while len(self._ended) > self._kept:
            self._ended.popitem(last=False)


def ended_ids(book: Any) -> list[str]:
    """Every id of a run that is over, in the order its requests ended (so the latest are forgotten last): those
    without an output first (the run failed before they ended), then in finish order (`outputs` is filled as
    requests finish)."""
    finished = [o.request_id for o in book.outputs.values()]
    return sorted(book.ids.difference(finished)) + finished
