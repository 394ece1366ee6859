"""The KV blocks of one run: the deferred pool, and the prefix cache in front of it. Pure Python, no torch.

A cached block is shared read-only. Two rules keep that safe with batches in flight, and both live here, not in
the (pluggable) cache index:

- **Reference counts.** A cached block is held by every running request that uses it. It can be dropped only
  when no request holds it: a request never loses a block it may still read or write.
- **Last reader.** A cached block remembers the last batch that read it, the latest over all its holders (not
  the last holder's own, which may be earlier). It becomes evictable only once that batch is behind the batch
  being planned, and when it is evicted the pool hands it out with that batch, so the next owner's first write
  waits for the last read: the `last use -> reuse` edge, for a block with many users.

Only full blocks whose tokens the host knows are cached (a pending token has no value on the host yet), and
only once the batch computing them has been planned: a later batch reads them after it on the compute stream.
"""

from __future__ import annotations

from typing import Any

from .pools import DeferredPool
from .requests import RequestState


class _Cache:
    def __repr__(self) -> str:
        return "prefix cache"


CACHE = _Cache()  # the pool's owner of every cached block


class KVBlocks:
    """Block ids `1..num_blocks-1` (0 is the trash block). The scheduling state sees `num_free` and `allocate`."""

    def __init__(self, num_blocks: int, block_size: int, cache: Any = None, *, share_safely: bool = True) -> None:
        self.pool = DeferredPool(num_blocks - 1, first=1, name="block")
        self.block_size = block_size
        self.cache = cache if cache is not None and getattr(cache, "enabled", True) else None
        # `share_safely` is False only in the test of the tests, which must then see wrong tokens.
        self.share_safely = share_safely  # False: a release lets go of a shared block for every holder
        self._refs: dict[int, int] = {}  # cached block -> requests holding it
        self._last: dict[int, int] = {}  # cached block -> last batch that read it, over all holders
        self._written: dict[int, int] = {}  # cached block -> the batch that computed it (readers wait for it)
        self._cooling: dict[int, int] = {}  # unheld cached blocks a batch in flight still reads -> that batch
        self._ready = 0  # unheld cached blocks no batch reads: evictable, counted as free
        self._batch = 0

    @property
    def size(self) -> int:
        return self.pool.size

    @property
    def num_free(self) -> int:
        return self.pool.num_free + self._ready

    @property
    def num_owned(self) -> int:
        """Blocks some request holds (its own, or cached ones it shares)."""
        return self.pool.num_owned - len(self._refs) + sum(1 for n in self._refs.values() if n)

    @property
    def num_cached(self) -> int:
        return len(self._refs)

    def owners(self) -> dict[int, object]:
        return {b: o for b, o in self.pool.owners().items() if o is not CACHE}

    def begin_batch(self, batch: int) -> None:
        self._batch = batch
        self.pool.begin_batch(batch)
        for b, last in list(self._cooling.items()):
            if last < batch:
                del self._cooling[b]
                self.cache.set_evictable(b, True)
                self._ready += 1

    def allocate(self, n: int, owner: object) -> list[tuple[int, int]] | None:
        short = n - self.pool.num_free
        if short > 0:
            if self.cache is None or short > self._ready:
                return None
            dropped = self.cache.evict(short)
            if len(dropped) != short:  # the index broke its contract; failing here beats a short block table
                raise AssertionError(f"the prefix cache evicted {len(dropped)} of {short} evictable blocks asked for")
            for b in dropped:
                self._ready -= 1
                del self._refs[b]
                del self._written[b]
                last = self._last.pop(b)
                self.pool.release([b], last, CACHE)  # last < this batch: free at once
        return self.pool.allocate(n, owner)

    # ---- the prefix cache
    def keys(self, req: RequestState, n: int) -> list[tuple[int, ...]]:
        """The content keys of `req`'s first `n` full blocks (memoised on the request)."""
        bs, keys = self.block_size, req.block_keys
        for i in range(len(keys), n):
            keys.append(tuple(req.tokens[i * bs:(i + 1) * bs]))
        return keys if len(keys) == n else keys[:n]

    def attach(self, req: RequestState) -> None:
        """Give waiting `req` the longest cached prefix of its known tokens, leaving at least one token to compute
        (the one that samples). Not held yet: `admit` takes the blocks if the scheduler admits `req`."""
        req.blocks, req.block_last_use, req.num_computed, req.num_cached = [], [], 0, 0
        req.num_offered = 0
        if self.cache is None:
            return
        hits = self.cache.match(self.keys(req, (len(req.tokens) - 1) // self.block_size))
        if hits:
            req.blocks, req.block_last_use = list(hits), [-1] * len(hits)
            req.num_computed = req.num_cached = len(hits) * self.block_size

    def admission_cost(self, req: RequestState) -> int | None:
        """Free blocks that taking `req`'s attached prefix uses up (unheld cached ones count as free), or None if
        the prefix is no longer cached (evicted since `attach`: `req` waits for the next batch)."""
        cost = 0
        for b in req.blocks:
            refs = self._refs.get(b)
            if refs is None:
                return None
            cost += refs == 0 and b not in self._cooling
        return cost

    def admit(self, req: RequestState) -> frozenset[int]:
        """`req` is admitted with its attached prefix: hold every block of it. Returns the batches that computed
        them: its first batch must wait for them (the `cached` edge)."""
        for b in req.blocks:
            self._hold(b)
        req.cached_total += req.num_cached
        return frozenset(self._written[b] for b in req.blocks if self._written[b] >= 0)

    def _hold(self, b: int) -> None:
        refs = self._refs[b]
        self._refs[b] = refs + 1
        if refs == 0:
            if self._cooling.pop(b, None) is None:
                self.cache.set_evictable(b, False)
                self._ready -= 1

    def publish(self, req: RequestState) -> None:
        """Offer `req`'s full blocks that are computed (or planned) and hold only known tokens to the cache. Those
        it takes change owner from `req` to the cache; `req` holds them like any sharer. A block's writer is
        taken as `req.last_batch`: the batch that computed it, or a later one of the same request (a reader then
        waits a little longer than it must, never less)."""
        if self.cache is None:
            return
        n = min(req.num_computed, len(req.tokens), len(req.blocks) * self.block_size) // self.block_size
        if n <= req.num_offered:  # nothing new: a decode fills a block every `block_size` steps
            return
        req.num_offered = n
        blocks = req.blocks[:n]
        for b, held in zip(blocks, self.cache.insert(self.keys(req, n), blocks)):
            if not held:
                # Another request cached this prefix first (both computed it in one batch): `req` keeps its copy,
                # and the index took nothing after it. So a request holds every cached block before one it holds,
                # an unheld block's descendants are unheld and read no later, and an index that drops leaves
                # first (radix) can always drop as many as `num_free` counts.
                break
            if b not in self._refs:
                self.pool.transfer(b, req, CACHE)
                self._refs[b] = 1
                self._last[b] = -1
                self._written[b] = req.last_batch

    def release(self, req: RequestState, last_batch: int) -> None:
        """`req` gives up its blocks; `last_batch` is the last batch that may touch them."""
        own = []
        for b in req.blocks:
            refs = self._refs.get(b)
            if refs is None:
                if self.pool.owner_of(b) is req:
                    own.append(b)
                continue  # (only without share_safely: a block dropped under another holder)
            self._last[b] = max(self._last[b], last_batch)
            if refs == 0:
                continue  # (only without share_safely: already let go by another holder)
            self._refs[b] = 0 if not self.share_safely else refs - 1
            if self._refs[b] == 0:
                if self._last[b] < self._batch:
                    self.cache.set_evictable(b, True)
                    self._ready += 1
                else:
                    self._cooling[b] = self._last[b]
        if own:
            self.pool.release(own, last_batch, req)
        req.num_offered = 0
