"""Hypothesis state machines over the KV block pool and the scheduler, without a model.

The pool: no id is owned twice, none is lost, and an id released in batch k is never handed out in batch k.
The scheduler (every built-in): budgets are never exceeded, no block is owned by two requests, every admitted
request eventually finishes, and when all requests end every block and row is back.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from strategies import sampling_params

from asyncbatch.core.book import RequestBook
from asyncbatch.core.pools import DeferredPool
from asyncbatch.core.requests import RequestState, Status
from asyncbatch.core.types import Request
from asyncbatch.plugins.builtin import asyncbatch_register_schedulers


class PoolMachine(RuleBasedStateMachine):
    """A DeferredPool driven by random allocations, releases and batch boundaries, against a simple model."""

    @initialize(size=st.integers(1, 40))
    def start(self, size):
        self.pool = DeferredPool(size, first=1, name="block")
        self.size = size
        self.batch = 0
        self.owned: dict[str, list[int]] = {}
        self.released_in_batch: set[int] = set()
        self.counter = 0

    @rule(n=st.integers(1, 8))
    def allocate(self, n):
        owner = f"r{self.counter}"
        self.counter += 1
        got = self.pool.allocate(n, owner)
        if got is None:
            assert n > self.pool.num_free
            return
        ids = [i for i, _ in got]
        assert not (set(ids) & self.released_in_batch), "an id was reused in the batch that released it"
        self.owned[owner] = ids

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def release(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owned)))
        ids = self.owned.pop(owner)
        self.pool.release(ids, self.batch, owner)
        self.released_in_batch.update(ids)

    @rule()
    def next_batch(self):
        self.batch += 1
        self.pool.begin_batch(self.batch)
        self.released_in_batch = set()

    @invariant()
    def nothing_owned_twice_nothing_lost(self):
        flat = [i for ids in self.owned.values() for i in ids]
        assert len(flat) == len(set(flat))
        assert self.size == len(flat) + self.pool.num_free + self.pool.num_deferred
        assert len(flat) == self.pool.num_owned


TestPool = PoolMachine.TestCase
TestPool.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def _schedulers():
    found = {}
    asyncbatch_register_schedulers(lambda name, factory, **_: found.__setitem__(name, factory))
    return found


SCHEDULERS = _schedulers()


class SchedulerMachine(RuleBasedStateMachine):
    """A request book and a built-in scheduler, driven batch by batch with up to `slots - 1` batches in flight
    whose sampled tokens arrive later (and sometimes stop a request early), as in the pipeline."""

    @initialize(name=st.sampled_from(sorted(SCHEDULERS)), slots=st.integers(1, 4), max_tokens=st.integers(4, 48),
                max_seqs=st.integers(1, 8), num_blocks=st.integers(12, 60), block_size=st.sampled_from([2, 4, 8]),
                seed=st.integers(0, 1000),
                work=st.lists(st.tuples(st.integers(1, 30), sampling_params(max_new=10)), min_size=1, max_size=12))
    def start(self, name, slots, max_tokens, max_seqs, num_blocks, block_size, seed, work):
        self.scheduler = SCHEDULERS[name](None)
        self.slots, self.max_tokens, self.max_seqs, self.block_size = slots, max_tokens, max(1, min(max_seqs,
                                                                                                     max_tokens)), block_size
        max_len = (num_blocks - 1) * block_size
        rng = random.Random(seed)
        self.rng = rng
        states = []
        for i, (length, params) in enumerate(work):
            length = min(length, max_len - 1)
            req = Request(str(i), tuple(rng.randrange(100) for _ in range(length)), params)
            states.append(RequestState(req, i, max_len, seed=i))
        self.book = RequestBook(states, num_blocks=num_blocks, num_rows=self.max_seqs)
        self.book.admit_arrivals(0.0)
        self.batch = 0
        self.inflight: list[list] = []
        self.admitted: set[str] = set()

    def _update_oldest(self):
        for entry in self.inflight.pop(0):
            if entry.samples:
                stop = entry.req.stop_ids and self.rng.random() < 0.2
                token = next(iter(entry.req.stop_ids)) if stop else self.rng.randrange(100)
                self.book.apply_token(entry, token, float(self.batch))

    @rule()
    def step(self):
        if not self.book.unfinished:
            if self.inflight:
                self._update_oldest()
            return
        state = self.book.plan(self.scheduler, self.batch, max_tokens=self.max_tokens, max_seqs=self.max_seqs,
                               block_size=self.block_size)
        entries = state.entries
        assert sum(e.num_tokens for e in entries) <= self.max_tokens
        assert len(entries) <= self.max_seqs
        assert len({id(e.req) for e in entries}) == len(entries)
        for e in entries:
            assert e.req.status is Status.RUNNING and 1 <= e.num_tokens
            assert len(e.req.blocks) * self.block_size >= e.start + e.num_tokens
            self.admitted.add(e.req.request_id)
        if not entries:
            if self.inflight:
                self._update_oldest()
            else:
                assert self.book.break_deadlock(self.scheduler), "stuck with nothing in flight"
            return
        self.book.on_scheduled(entries, self.batch)
        self.inflight.append(entries)
        self.batch += 1
        while len(self.inflight) > self.slots - 1:
            self._update_oldest()

    @invariant()
    def no_block_owned_twice(self):
        owners = self.book.blocks.owners()
        by_request: dict[int, list[int]] = {}
        for block, owner in owners.items():
            by_request.setdefault(id(owner), []).append(block)
        for req in self.book.states:
            if req.blocks:
                assert sorted(req.blocks) == sorted(by_request.get(id(req), []))

    def teardown(self):
        # Drain: every admitted request finishes within a bounded number of steps, and nothing leaks.
        for _ in range(5000):
            if not self.book.unfinished:
                break
            self.step()
        while self.inflight:
            self._update_oldest()
        assert 0 == self.book.unfinished
        assert all(o.finish_reason in ("length", "stop") for o in self.book.results())
        self.book.blocks.begin_batch(self.batch + 1)
        self.book.check_released()


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
