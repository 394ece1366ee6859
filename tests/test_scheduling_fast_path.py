"""`SchedulingState.add(req, 1)` for a running request takes a short path (the step loop's hot path); it must do
exactly what the general path does: accept the same requests, leave the same accounting and the same entry."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch.core.pools import DeferredPool
from asyncbatch.core.requests import RequestState, Status
from asyncbatch.core.scheduling import SchedulingState
from asyncbatch.core.types import Request

BLOCK = 4


@st.composite
def running_requests(draw) -> RequestState:
    prompt = draw(st.integers(1, 6))
    req = RequestState(Request("r", tuple(range(prompt))), 0, max_len=256, seed=0)
    req.status = Status.RUNNING
    req.row = 0
    req.tokens += list(range(draw(st.integers(0, 3))))  # outputs the host has read
    req.num_pending = draw(st.integers(0, 2))
    req.num_computed = draw(st.integers(0, len(req.tokens) + req.num_pending))
    held = -(-req.num_computed // BLOCK) + draw(st.integers(0, 1))  # whole blocks for what is computed, or one more
    req.blocks = list(range(100, 100 + held))
    req.block_last_use = [-1] * held
    req.last_batch = draw(st.integers(-1, 5))
    return req


@settings(max_examples=500, deadline=None)
@given(req=running_requests(), others=st.lists(running_requests(), max_size=4), free=st.integers(0, 4),
       tokens=st.integers(0, 3), seqs=st.integers(0, 3), already=st.booleans())
def test_one_token_of_a_running_request_is_added_as_the_general_path_adds_it(req, others, free, tokens, seqs,
                                                                               already):
    def build():
        r, o = copy.deepcopy((req, others))
        blocks = DeferredPool(8, name="block")
        for _ in range(8 - free):
            blocks.allocate(1, "someone")
        state = SchedulingState(7, [r, *o], [], max_tokens=tokens, max_seqs=seqs, blocks=blocks,
                                rows=DeferredPool(8, name="row"), block_size=BLOCK)
        if already:
            state._added.add(id(r))
        return state, r

    fast, r_fast = build()
    slow, r_slow = build()

    assert slow._add_any(r_slow, 1) == fast.add(r_fast, 1)
    assert (slow.num_refused, slow.token_budget, slow.seq_budget, slow._reserve, slow._blocks.num_free) == \
           (fast.num_refused, fast.token_budget, fast.seq_budget, fast._reserve, fast._blocks.num_free)
    assert [attrs_of(e) for e in slow.entries] == [attrs_of(e) for e in fast.entries]
    assert (r_slow.num_computed, r_slow.num_pending, r_slow.blocks, r_slow.last_batch) == \
           (r_fast.num_computed, r_fast.num_pending, r_fast.blocks, r_fast.last_batch)


def attrs_of(entry) -> tuple:
    return (entry.num_tokens, entry.start, entry.samples, entry.row, entry.new_blocks, entry.prev_batch,
            entry.reuse_after, entry.admitted, entry.carries, entry.reads_after)
