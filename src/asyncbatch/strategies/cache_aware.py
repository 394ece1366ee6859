"""Cache-aware schedulers: admit waiting requests by how much of their prompt the prefix cache already holds.

Pure Python: no torch, no streams, no events, no clock (they run under every pipeline, and tensor-parallel ranks
plan identical steps from identical inputs). The only prefix-cache information used is
`SchedulingState.cached_tokens(req)`, which any plugin scheduler can read too; without a prefix cache it is 0 for
every request and both schedulers plan exactly what `fifo` plans (`defer_shared` acts only with a cache).

Strategy modules import only the core, never each other (tests/test_import_graph.py): the loops that fill decodes
and prompts are the core's `add_decodes` and `add_prefills`, the ones `fifo` uses.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import attrs

from ..core.interfaces import Scheduler
from ..core.requests import RequestState
from ..core.scheduling import SchedulingState, add_decodes, add_prefills


def _arrival(req: RequestState) -> tuple[float, int]:
    """Arrival order, as the engine orders `state.waiting`: arrival time, then input index."""
    return req.arrival_time, req.index


def _add_decodes(state: SchedulingState) -> None:
    """One token for every running request that decodes, in admission order."""
    add_decodes(state, state.running)


def _add_running_prefills(state: SchedulingState, chunked: bool) -> None:
    """The rest of prompts already admitted (split across batches), in admission order."""
    add_prefills(state, (r for r in state.running if r.is_prefill), chunked, stop_at_first_refusal=False)


def _shares_a_block_in_flight(state: SchedulingState, req: RequestState, admitted: list[RequestState]) -> bool:
    """Whether `req`'s prompt continues past its cached tokens with at least one whole block that a request
    admitted in this batch also starts with: that request computes the block now, so the cache can supply it to
    `req` from the next batch on, instead of `req` computing it a second time."""
    n = state.cached_tokens(req) + state.block_size
    prompt = req.request.prompt_ids
    return len(prompt) >= n and any(a.request.prompt_ids[:n] == prompt[:n] for a in admitted)


def _admit_waiting(state: SchedulingState, ranked: Iterable[RequestState], chunked: bool, *,
                   defer_shared: bool, never_defer: Collection[str] = ()) -> None:
    """New requests in `ranked` order until a budget runs out or one does not fit (nothing overtakes it). With
    `defer_shared`, a request (unless its id is in `never_defer`) that would recompute a block another request
    admitted in this batch is computing is passed over for this batch."""
    admitted: list[RequestState] = []
    for req in ranked:
        if state.token_budget == 0 or state.seq_budget == 0:
            return
        if defer_shared and admitted and req.request_id not in never_defer and \
                _shares_a_block_in_flight(state, req, admitted):
            continue
        n = state.max_chunk(req) if chunked else req.num_remaining
        if not (n > 0 and state.add(req, n)):
            return
        admitted.append(req)


def _by_cached_prefix(state: SchedulingState, requests: Iterable[RequestState]) -> list[RequestState]:
    """Most cached prompt tokens first; ties in arrival order."""
    return sorted(requests, key=lambda r: (-state.cached_tokens(r), *_arrival(r)))


def _non_negative(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attribute.name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class LongestPrefixFirstConfig:
    """`chunked_prefill`: split prompts that exceed the remaining token budget across batches. `defer_shared`:
    pass over, for one batch, a new request whose uncached prompt starts with a whole block that a request
    admitted in the same batch is computing (it gets that block from the cache next batch). Applies only while a
    prefix cache serves the run (`state.prefix_cache_on`): without one it would merely delay such requests."""

    chunked_prefill: bool = True
    defer_shared: bool = True


class LongestPrefixFirst(Scheduler):
    """Decode first, then unfinished prefills, then new requests by longest cached prefix (ties: arrival order).

    SGLang's longest-prefix-match policy. A request whose prompt prefix is in the prefix cache
    (`state.cached_tokens(req)`) needs only the rest of its prompt prefilled, so it is cheap to admit; admitting it
    while its prefix is still cached keeps the hit, where waiting longer risks the prefix being evicted. Prompts are
    chunked as in `fifo`, and admission stops at the first request that does not fit, so a request is never
    overtaken by one ranked after it. Requests with nothing cached may wait indefinitely behind a stream of cache
    hits: `fair_prefix` bounds that. Without a prefix cache every request has 0 cached tokens and this is `fifo`.

    The ranking sees only what is cached when the batch is planned. Two new requests that share an uncached prefix
    tie on 0 and may be admitted in the same batch, both computing the prefix (`fifo` may by chance have split
    them); `defer_shared` (on by default, with a cache) holds the second one back for a batch so that it gets the
    prefix from the cache.
    """

    Config = LongestPrefixFirstConfig

    def __init__(self, config: LongestPrefixFirstConfig | None = None) -> None:
        self.config = config or LongestPrefixFirstConfig()

    def schedule(self, state: SchedulingState) -> None:
        chunked = self.config.chunked_prefill
        _add_decodes(state)
        _add_running_prefills(state, chunked)
        _admit_waiting(state, _by_cached_prefix(state, state.waiting), chunked,
                       defer_shared=self.config.defer_shared and state.prefix_cache_on)


@attrs.frozen
class FairPrefixConfig:
    """`max_skips`: how many batches a waiting request may be overtaken in (a later-arrived request admitted while it
    keeps waiting) before it goes first in line; 0 is `fifo` order. `chunked_prefill`, `defer_shared`: as in
    `longest_prefix_first` (a due request is never deferred)."""

    max_skips: int = attrs.field(default=4, validator=_non_negative)
    chunked_prefill: bool = True
    defer_shared: bool = True


class FairPrefix(Scheduler):
    """`longest_prefix_first` with a bound: no waiting request is overtaken in more than `max_skips` batches.

    Decodes first, then unfinished prefills, then waiting requests: first the *due* ones (overtaken in
    `max_skips` batches already) in arrival order, then the others by longest cached prefix (ties: arrival order).
    Admission stops at the first waiting request that does not fit.

    Guarantee: a request is *overtaken* in a batch when it is waiting (arrived, not admitted) and leaves that batch
    still waiting while some request that arrived after it (arrival time, then input order) was admitted in it.
    Every request is overtaken in at most `max_skips` batches per wait (a preempted request starts a new wait).
    Once due, only earlier arrivals can be admitted before it, and nothing after it is admitted in a batch where it
    does not fit. It is not a bound on waiting time: a request that does not fit waits, but nothing later passes.
    `max_skips: 0` is `fifo` order; a large value approaches `longest_prefix_first`.

    The counts are kept per request id across batches. They depend only on what the scheduler sees (never on a
    clock), so every tensor-parallel rank plans the same steps.
    """

    Config = FairPrefixConfig

    def __init__(self, config: FairPrefixConfig | None = None) -> None:
        self.config = config or FairPrefixConfig()
        self.skips: dict[str, int] = {}  # request id -> batches of this wait in which it was overtaken

    def schedule(self, state: SchedulingState) -> None:
        chunked = self.config.chunked_prefill
        _add_decodes(state)
        _add_running_prefills(state, chunked)
        # Counts of requests no longer waiting (admitted, cancelled, finished) are dropped: a new wait starts at 0.
        skips = {r.request_id: self.skips.get(r.request_id, 0) for r in state.waiting}
        due = sorted((r for r in state.waiting if skips[r.request_id] >= self.config.max_skips), key=_arrival)
        rest = _by_cached_prefix(state, (r for r in state.waiting if skips[r.request_id] < self.config.max_skips))
        _admit_waiting(state, [*due, *rest], chunked, defer_shared=self.config.defer_shared and state.prefix_cache_on,
                       never_defer={r.request_id for r in due})
        admitted = [_arrival(e.req) for e in state.entries if e.admitted]
        latest = max(admitted, default=None)
        for req in state.waiting:
            if state.is_added(req):
                skips.pop(req.request_id, None)
            elif latest is not None and _arrival(req) < latest:
                skips[req.request_id] = skips.get(req.request_id, 0) + 1
        self.skips = skips
