"""Cancels that may come from any thread, before or during the run that holds their request."""

from __future__ import annotations

import threading
from typing import Any


class Cancels:
    """The engine's cancel box. `attach(book)` when a run starts and `detach()` when it ends, by the running thread;
    `cancel(id)` from any thread. A cancel for a request no run holds yet waits here, and applies when a run that
    holds it attaches its book."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._book: Any = None
        self._pending: set[str] = set()

    def attach(self, book: Any) -> None:
        with self._lock:
            self._book = book
            for rid in self._pending & book.ids:
                book.cancel(rid)
            self._pending -= book.ids

    def detach(self) -> None:
        with self._lock:
            self._book = None

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if self._book is None or not self._book.cancel(request_id):
                self._pending.add(request_id)

    def forget(self, request_ids: Any) -> None:
        """Drop waiting cancels for `request_ids`: the run they were meant for is over, so they must not cancel a
        later run's request that reuses an id."""
        with self._lock:
            self._pending.difference_update(request_ids)
