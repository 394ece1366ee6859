"""What a scheduler sees and the one way it adds work: `SchedulingState.add`. Pure Python, no torch.

`add` commits on accept: it admits the request (a row), allocates the KV blocks the chunk needs, and advances the
request's accounting. It refuses (returns False, changes nothing) when a budget, a row or blocks are lacking, so a
scheduler can never overcommit. Blocks the running decodes need for their next token are reserved: admitting new
work cannot starve requests already running.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from .kv_blocks import KVBlocks
from .pools import DeferredPool
from .requests import RequestState, Status


@attrs.define(slots=True)
class BatchEntry:
    """One request's share of a batch: `num_tokens` tokens from position `start`; `samples` if it yields a token."""

    req: RequestState
    num_tokens: int
    start: int
    samples: bool
    row: int
    new_blocks: list[int]
    prev_batch: int  # the request's previous batch: it wrote the KV and pending token this one reads
    reuse_after: set[int]  # batches that last used the blocks/row this entry received (reuse waits on them)
    admitted: bool  # took a row in this batch
    carries: bool = False  # its newest input token is pending on the device
    reads_after: frozenset[int] = frozenset()  # batches that computed the cached blocks it reads (prefix hits)


@attrs.frozen
class PendingView:
    """What `Scheduler.needs_fresh_tokens` sees before batch `batch_index` is planned.

    `in_flight` batches were launched and their tokens are not read yet; `running` are the admitted requests
    (read-only), each with `num_pending` tokens on the device that the host does not know.
    """

    batch_index: int
    in_flight: int
    running: tuple[RequestState, ...]

    @property
    def num_pending(self) -> int:
        """Tokens sampled on the device that the host has not read, over all running requests."""
        return sum(r.num_pending for r in self.running)


class SchedulingState:
    """Built by the engine for one batch; passed to `Scheduler.schedule`.

    `running` holds admitted requests that still need tokens, in admission order; `waiting` holds arrived
    requests without a row (new or preempted), in arrival order. Both are read-only to the scheduler.
    `in_flight` is how many earlier batches are still on the device: their tokens are pending (the scheduler's
    view lags by that many steps; see `Scheduler.needs_fresh_tokens`).
    """

    def __init__(
        self,
        batch_index: int,
        running: Sequence[RequestState],
        waiting: Sequence[RequestState],
        *,
        max_tokens: int,
        max_seqs: int,
        blocks: DeferredPool | KVBlocks,
        rows: DeferredPool,
        block_size: int,
        in_flight: int = 0,
    ) -> None:
        self.batch_index = batch_index
        self.in_flight = in_flight
        self.running = tuple(running)
        self.waiting = tuple(waiting)
        self.token_budget = max_tokens
        self.seq_budget = max_seqs
        self.block_size = block_size
        self._blocks = blocks
        self._kv = blocks if isinstance(blocks, KVBlocks) and blocks.cache is not None else None
        self._rows = rows
        self.entries: list[BatchEntry] = []
        self._added: set[int] = set()
        self.num_refused = 0
        self._reserve = sum(self.blocks_needed(r, 1) for r in self.running if r.is_decode)
        self._admit_counter = 0

    # ---- queries
    def blocks_needed(self, req: RequestState, num_tokens: int) -> int:
        bs = self.block_size
        return max(0, -(-(req.num_computed + num_tokens) // bs) - len(req.blocks))

    @property
    def prefix_cache_on(self) -> bool:
        """Whether a prefix cache serves this run (`engine.prefix_cache` other than `none`)."""
        return self._kv is not None

    def cached_tokens(self, req: RequestState) -> int:
        """Prompt tokens of `req` whose KV the prefix cache supplies: for a waiting request, what its admission
        in this batch would reuse (already subtracted from `req.num_remaining`); for a running one, what its
        admission reused. Always 0 with `engine.prefix_cache: none`."""
        return req.num_cached

    def max_chunk(self, req: RequestState) -> int:
        """The most tokens of `req` that fit the token budget now (0 if none)."""
        return min(req.num_remaining, self.token_budget)

    @property
    def free_blocks(self) -> int:
        return self._blocks.num_free

    @property
    def free_rows(self) -> int:
        return self._rows.num_free

    def is_added(self, req: RequestState) -> bool:
        return id(req) in self._added

    def can_add(self, req: RequestState, num_tokens: int) -> bool:
        if id(req) in self._added or not req.is_schedulable:
            return False
        if num_tokens < 1 or num_tokens > req.num_remaining:
            return False
        if num_tokens > self.token_budget or self.seq_budget < 1:
            return False
        need = self.blocks_needed(req, num_tokens)
        if req.status is Status.WAITING:
            if self._rows.num_free < 1:
                return False
            # Admit only what can finish its prompt without eating the running decodes' reserve. Its cached prefix
            # costs the unheld cached blocks it takes out of the free count.
            cost = self._kv.admission_cost(req) if self._kv is not None else 0
            if cost is None:  # the prefix was evicted by an earlier admission of this batch
                return False
            whole = self.blocks_needed(req, req.num_remaining)
            return whole + cost <= self._blocks.num_free - self._reserve
        own = self.blocks_needed(req, 1) if req.is_decode else 0  # its own share of the reserve
        return need <= self._blocks.num_free - (self._reserve - own)

    # ---- the one mutation
    def add(self, req: RequestState, num_tokens: int) -> bool:
        """Put `num_tokens` of `req` into this batch. Returns False (and changes nothing) if it does not fit."""
        if num_tokens == 1 and req.status is Status.RUNNING:
            return self._add_one_running(req)
        return self._add_any(req, num_tokens)

    def _add_any(self, req: RequestState, num_tokens: int) -> bool:
        """`add` for any request and chunk: `can_add`, then admission where it is waiting, then the commit."""
        if not self.can_add(req, num_tokens):
            self.num_refused += 1
            return False
        waits: set[int] = set()
        admitted = req.status is Status.WAITING
        cached: list[int] = []
        reads: frozenset[int] = frozenset()
        if admitted:
            if self._kv is not None:
                reads = self._kv.admit(req)  # hold the cached prefix before allocating, which may evict
            cached = list(req.blocks)
            ((row, last),) = self._rows.allocate(1, req)
            req.row, req.row_last_use = row, last
            req.status = Status.RUNNING
            if last >= 0:
                waits.add(last)
        if req.is_decode and not admitted:  # a running decode takes its reserved block (an admitted request whose
            self._reserve -= self.blocks_needed(req, 1)  # cached prefix leaves one token looks like a decode too)
        self._commit(req, num_tokens, self.blocks_needed(req, num_tokens), num_tokens == req.num_remaining,
                     admitted, cached, waits, reads)
        return True

    def _add_one_running(self, req: RequestState) -> bool:
        """`add(req, 1)` for a running request: what `can_add` and `add` do, with each of the request's counts
        read once. Every decode of every batch comes here, so it is the scheduler's hot path (measured: a third
        of the host's scheduling time at batch 256 went to recomputing the same properties)."""
        computed = req.num_computed
        remaining = len(req.tokens) + req.num_pending - computed
        if id(req) in self._added or remaining < 1 or self.token_budget < 1 or self.seq_budget < 1:
            self.num_refused += 1
            return False
        need = max(0, -(-(computed + 1) // self.block_size) - len(req.blocks))
        decode = remaining == 1 and computed > 0  # `req.is_decode`
        if need > self._blocks.num_free - (self._reserve - (need if decode else 0)):
            self.num_refused += 1
            return False
        if decode:
            self._reserve -= need
        self._commit(req, 1, need, remaining == 1, False, [], set(), frozenset())
        return True

    def _commit(self, req: RequestState, num_tokens: int, need: int, samples: bool, admitted: bool,
                cached: list[int], waits: set[int], reads: frozenset[int]) -> None:
        """The part of `add` common to every request: its blocks, its accounting and its entry. `samples`: the
        chunk ends its prompt (or is a decode), so the step samples a token for it."""
        got = self._blocks.allocate(need, req) if need else []
        if got is None:  # `can_add` counted them free: a broken count, never a short block table
            raise AssertionError(f"{need} KV blocks counted free for {req!r} could not be allocated")
        new_blocks = cached + [b for b, _ in got]  # new to its row's block table
        for b, last in got:
            req.blocks.append(b)
            req.block_last_use.append(last)
            if last >= 0:
                waits.add(last)
        prev_batch = req.last_batch if not admitted else -1
        start = req.num_computed
        carries = start + num_tokens > len(req.tokens)
        req.num_computed += num_tokens
        if samples:
            req.num_pending += 1
        req.last_batch = self.batch_index
        self.entries.append(BatchEntry(req, num_tokens, start, samples, req.row, new_blocks, prev_batch, waits,
                                       admitted, carries, reads))
        self._added.add(id(req))
        self.token_budget -= num_tokens
        self.seq_budget -= 1

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)


# ---- building blocks any scheduler may use (the built-in ones do)
def add_decodes(state: SchedulingState, requests: Iterable[RequestState]) -> None:
    """One token for every request in `requests` that decodes, in that order, while the budgets last."""
    for req in requests:
        if state.seq_budget == 0 or state.token_budget == 0:
            return
        if req.is_decode:
            state.add(req, 1)


def add_prefills(state: SchedulingState, requests: Iterable[RequestState], chunked: bool, *,
                 stop_at_first_refusal: bool) -> None:
    """Prompt tokens of `requests` in that order: as much as fits (`chunked`) or whole prompts only.
    `stop_at_first_refusal` keeps the order strict: nothing after a request that does not fit is added."""
    for req in requests:
        if state.token_budget == 0 or state.seq_budget == 0:
            return
        n = state.max_chunk(req) if chunked else req.num_remaining
        if n > 0 and state.add(req, n):
            continue
        if stop_at_first_refusal:
            return  # keep the order: later requests must not overtake one that does not fit yet
