"""Tensor-parallel ranks on the `sim` runtime, in one process: each rank's compute ops meet the other ranks'.

On GPUs the ranks of a tensor-parallel group meet inside every step: each decoder layer's all-reduce waits until
every rank has reached it, and NCCL requires the ranks to issue their collectives in the same order with the
same shapes. A `SimGroup` gives the `sim` runtime the same coupling. Each rank runs its own engine, with its own
`SimRuntime` (its own op order, timing and happens-before checker), on a thread of its own; a rank's compute ops
run in the order it issued them, as on one NCCL communicator; and each compute op starts only once every rank
has reached the same one, at the latest of their start times in virtual time. What each rank brings to a
meeting is its step's signature (batch index, padded tokens, and the plan: request, first position and tokens
of every entry, when the runtime checks accesses); ranks that bring different ones have split, and the run fails
naming them, as would a rank that does not arrive within `timeout_s` (a deadlock between the ranks' host waits).

So the engine's event edges are checked with the ranks coupled the way they are on cards, and a researcher can
study, in virtual time, how a slow host on one rank stalls every rank's device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import AsyncBatchError


class RanksSplitError(AsyncBatchError, RuntimeError):
    """Ranks of a `SimGroup` brought different steps to a collective, or one never came."""


class SimGroup:
    """The meeting point of `size` ranks' compute ops. Thread-safe: each rank runs on its own thread."""

    def __init__(self, size: int, *, timeout_s: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"a group needs at least one rank, got {size}")
        self.size = size
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._arrived: dict[int, dict[int, tuple[Any, float]]] = {}  # meeting -> rank -> (signature, earliest)
        self._starts: dict[int, float] = {}  # meeting -> the virtual time all ranks start it
        self.meetings: list[tuple[Any, float]] = []  # (signature, start) of every meeting held, in order
        self.failure: RanksSplitError | None = None

    def arrive(self, rank: int, meeting: int, signature: Any, earliest: float) -> float | None:
        """Rank `rank` has reached its `meeting`-th collective, which it could start at `earliest` (virtual ms).
        Returns the start time once every rank has arrived, else None. Never blocks; arriving twice is a no-op."""
        with self._cond:
            self._raise_if_failed()
            arrived = self._arrived.setdefault(meeting, {})
            arrived.setdefault(rank, (signature, earliest))
            if meeting not in self._starts and len(arrived) == self.size:
                signatures = {rank: sig for rank, (sig, _) in sorted(arrived.items())}
                if len(set(map(repr, signatures.values()))) > 1:
                    self._fail(RanksSplitError(
                        f"the ranks split at collective {meeting}: " +
                        "; ".join(f"rank {r} brought {sig}" for r, sig in signatures.items())))
                start = max(e for _, e in arrived.values())
                self._starts[meeting] = start
                self.meetings.append((signature, start))
                self._cond.notify_all()
            return self._starts.get(meeting)

    def wait(self, rank: int, meeting: int) -> float:
        """Block until every rank has arrived at `meeting`; its start time. Fails the whole group after
        `timeout_s` without the others."""
        with self._cond:
            if not self._cond.wait_for(lambda: meeting in self._starts or self.failure is not None,
                                       timeout=self.timeout_s):
                missing = sorted(set(range(self.size)) - set(self._arrived.get(meeting, {})))
                self._fail(RanksSplitError(
                    f"rank {rank} waited {self.timeout_s:g} s at collective {meeting} for rank(s) "
                    f"{', '.join(map(str, missing))}, which never reached it"))
            self._raise_if_failed()
            return self._starts[meeting]

    def fail(self, exc: BaseException, rank: int) -> None:
        """A rank stopped with `exc`: the others stop waiting for it."""
        with self._cond:
            if self.failure is None:
                self._fail(RanksSplitError(f"rank {rank} failed: {type(exc).__name__}: {exc}"))

    def _fail(self, exc: RanksSplitError) -> None:
        self.failure = exc
        self._cond.notify_all()
        raise exc

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure


def run_ranks(engines: Sequence[Any], run: Callable[[Any], Any], *, timeout_s: float = 60.0) -> list[Any]:
    """Run `run(engine)` for every engine at once, one thread per rank, their `sim` runtimes joined in one
    `SimGroup` (rank = position in `engines`). Returns each rank's result; raises the first rank's failure (a
    `RanksSplitError` if the ranks split)."""
    group = SimGroup(len(engines), timeout_s=timeout_s)
    for rank, engine in enumerate(engines):
        engine.runtime.join(group, rank)
    results: list[Any] = [None] * len(engines)
    errors: list[tuple[int, BaseException]] = []

    def one(rank: int) -> None:
        try:
            results[rank] = run(engines[rank])
        except BaseException as exc:  # noqa: BLE001  (reported below, after every rank has stopped)
            errors.append((rank, exc))
            try:
                group.fail(exc, rank)
            except RanksSplitError:
                pass

    threads = [threading.Thread(target=one, args=(r,), name=f"sim-rank-{r}") for r in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        # The rank that failed first names the cause; the others failed because it stopped.
        first = next((e for _, e in errors if not isinstance(e, RanksSplitError)), errors[0][1])
        raise first
    return results
