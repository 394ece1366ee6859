"""Block and row pools with deferred release. Pure Python: schedulers and property tests use these directly.

A released id carries the index of the last batch that may touch it. It is never handed out again inside that
batch (so two requests never share an id within one batch), and whoever receives it next learns that batch, so
its first device use can wait on the last old one (the `last use -> reuse` edge).
"""

from __future__ import annotations

from collections import deque


class DeferredPool:
    """Ids `first..first+size-1`. `allocate` returns (id, last_batch_that_used_it) pairs, -1 when never used."""

    def __init__(self, size: int, *, first: int = 0, name: str = "id") -> None:
        if size < 1:
            raise ValueError(f"a {name} pool needs at least one {name}, got {size}")
        self.name = name
        self.size = size
        self._free: deque[tuple[int, int]] = deque((i, -1) for i in range(first, first + size))
        self._deferred: list[tuple[int, int]] = []
        self._owner: dict[int, object] = {}
        self._batch = 0

    def begin_batch(self, batch: int) -> None:
        """Called before preparing `batch`: ids whose last use is an earlier batch become allocatable."""
        self._batch = batch
        if self._deferred:
            keep = []
            for item in self._deferred:
                (self._free if item[1] < batch else keep).append(item)
            self._deferred = keep

    @property
    def num_free(self) -> int:
        """Ids allocatable now (deferred ones excluded)."""
        return len(self._free)

    @property
    def num_deferred(self) -> int:
        return len(self._deferred)

    @property
    def num_owned(self) -> int:
        return len(self._owner)

    def allocate(self, n: int, owner: object) -> list[tuple[int, int]] | None:
        if n > len(self._free):
            return None
        out = [self._free.popleft() for _ in range(n)]
        for i, _ in out:
            if i in self._owner:  # an invariant, not input validation: fail loudly
                raise AssertionError(f"{self.name} {i} handed to {owner!r} while owned by {self._owner[i]!r}")
            self._owner[i] = owner
        return out

    def release(self, ids: list[int], last_batch: int, owner: object) -> None:
        for i in ids:
            if self._owner.get(i) is not owner:
                raise AssertionError(f"{owner!r} released {self.name} {i} it does not own")
            del self._owner[i]
            item = (i, last_batch)
            (self._free if last_batch < self._batch else self._deferred).append(item)

    def transfer(self, i: int, old: object, new: object) -> None:
        """Id `i` changes owner (a block a request computed, taken over by the prefix cache)."""
        if self._owner.get(i) is not old:
            raise AssertionError(f"{old!r} gave away {self.name} {i} it does not own")
        self._owner[i] = new

    def owner_of(self, i: int) -> object | None:
        return self._owner.get(i)

    def owners(self) -> dict[int, object]:
        return dict(self._owner)
