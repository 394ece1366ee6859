"""Prefix caching (`engine.prefix_cache`): the two indexes, the block manager's sharing rules, and the engine with
the cache on giving exactly the tokens it gives with the cache off, on every architecture, under every pipeline
shape, under cache pressure and preemption, with no race; and the test of the tests: breaking the sharing rule
is caught."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.kv_blocks import KVBlocks
from asyncbatch.core.pipeline import PipelineDebug
from asyncbatch.core.requests import RequestState, Status
from asyncbatch.core.types import Request
from asyncbatch.strategies.prefix_cache import HashedBlocks, RadixTree
from asyncbatch.testing import InvariantError, check_engine, combinations

INDEXES = {"blocks": HashedBlocks, "radix": RadixTree}
A, B, C, D = (1, 1), (2, 2), (3, 3), (4, 4)


# ---------------------------------------------------------------- the indexes
@pytest.mark.parametrize("name", list(INDEXES))
def test_a_block_is_found_only_through_the_blocks_before_it(name):
    index = INDEXES[name]()

    assert [True, True, True] == index.insert([A, B, C], [10, 11, 12])
    assert [10, 11, 12] == index.match([A, B, C, D])
    assert [10] == index.match([A, D])
    assert [] == index.match([B, C])  # the same tokens at another position are another prefix
    assert [True, True] == index.insert([B, C], [13, 14])
    assert ([13, 14], [10, 11, 12]) == (index.match([B, C]), index.match([A, B, C]))


@pytest.mark.parametrize("name", list(INDEXES))
def test_a_prefix_already_held_keeps_its_block(name):
    index = INDEXES[name]()
    index.insert([A, B], [10, 11])

    assert [True, False, False] == index.insert([A, B, C], [10, 20, 21])
    assert [10, 11] == index.match([A, B, C])  # nothing is inserted after a prefix held under another block


def test_the_radix_tree_evicts_leaves_only_so_a_shared_prefix_outlives_its_continuations():
    index = RadixTree()
    index.insert([A, B, C], [10, 11, 12])
    index.insert([A, B, D], [10, 11, 13])
    for b in (10, 11, 12, 13):  # the prefix became evictable first: least recently used
        index.set_evictable(b, True)

    assert [12, 13] == index.evict(2)
    assert [10, 11] == index.match([A, B, C])
    assert [11, 10] == index.evict(5)  # then the prefix, leaf by leaf
    assert [] == index.match([A])


def test_hashed_blocks_evict_the_least_recently_used_whatever_its_depth():
    index = HashedBlocks()
    index.insert([A, B, C], [10, 11, 12])
    for b in (10, 11, 12):
        index.set_evictable(b, True)

    assert [10] == index.evict(1)
    assert [] == index.match([A, B, C])  # the rest cannot be reached without its first block


@pytest.mark.parametrize("name", list(INDEXES))
def test_a_block_no_longer_evictable_is_never_evicted(name):
    index = INDEXES[name]()
    index.insert([A, B], [10, 11])
    index.set_evictable(11, True)
    index.set_evictable(11, False)

    assert [] == index.evict(3)


# ---------------------------------------------------------------- the block manager
def _req(tokens, index=0) -> RequestState:
    return RequestState(Request(str(index), tuple(tokens)), index, 1024, 0)


def _running(kv: KVBlocks, req: RequestState, batch: int) -> None:
    """Admit `req` (attached prefix held) and give it the blocks for its whole prompt, as `SchedulingState.add`."""
    kv.admit(req)
    need = -(-len(req.tokens) // kv.block_size) - len(req.blocks)
    req.blocks += [b for b, _ in kv.allocate(need, req)]
    req.status, req.num_computed, req.last_batch = Status.RUNNING, len(req.tokens), batch
    kv.publish(req)


def test_a_shared_block_stays_until_its_last_holder_releases_it_and_its_last_read_is_over():
    kv = KVBlocks(6, 2, RadixTree())  # 5 blocks of 2 tokens
    kv.begin_batch(0)
    first, second = _req([1, 2, 3, 4, 9]), _req([1, 2, 3, 4, 8], 1)
    _running(kv, first, 0)
    kv.begin_batch(1)
    kv.attach(second)
    assert (4, first.blocks[:2]) == (second.num_computed, second.blocks)
    _running(kv, second, 1)

    kv.release(first, 5)  # read until batch 5; `second` still holds the shared prefix
    kv.begin_batch(5)
    assert (3, 1) == (kv.num_owned, kv.num_free)  # its private third block waits for batch 5 to be over
    kv.begin_batch(6)
    assert (3, 2) == (kv.num_owned, kv.num_free)
    kv.release(second, 1)  # the last holder: the prefix stays cached, unheld, evictable (free)
    assert (0, 5, 2) == (kv.num_owned, kv.num_free, kv.num_cached)
    kv.attach(third := _req([1, 2, 3, 4, 5], 2))
    assert first.blocks[:2] == third.blocks


def test_an_evicted_block_is_handed_out_with_the_last_batch_of_all_its_readers():
    kv = KVBlocks(4, 2, HashedBlocks())  # 3 blocks
    kv.begin_batch(0)
    a, b = _req([1, 2, 7]), _req([1, 2, 8], 1)
    _running(kv, a, 0)
    kv.begin_batch(1)
    kv.attach(b)
    _running(kv, b, 1)
    kv.release(b, 9)  # the later reader releases first
    kv.release(a, 3)
    kv.begin_batch(10)

    got = kv.allocate(3, "new")

    assert 9 == dict(got)[a.blocks[0]]  # the reuse waits for batch 9, not for the last releaser's batch 3


# ---------------------------------------------------------------- the engine
def _shared(n_prefixes=3, per_prefix=5, prefix_len=40, seed=0, vocab=512, max_new=8) -> list:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab) for _ in range(prefix_len)] for _ in range(n_prefixes)]
    return [(p + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))], SamplingParams(max_new_tokens=max_new))
            for _ in range(per_prefix) for p in prefixes]


def _run(model, work, prefix_cache: str, **cfg) -> Engine:
    engine = Engine.from_model(model, EngineConfig.from_dict({"runtime": "cpu", "prefix_cache": prefix_cache,
                                                              **cfg}))
    engine.generate([p for p, _ in work], [s for _, s in work])
    return engine


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
@pytest.mark.parametrize("cache", ["blocks", "radix"])
def test_greedy_tokens_with_the_cache_equal_those_without_on_every_architecture(model_factory, arch, cache):
    """float32; prefixes of 80 tokens, past the 64-token sliding window of tiny-mistral: a cached block holds
    the keys and values of its positions, which depend on every token before them, window or not."""
    model = model_factory(arch, "float32")
    work = _shared(prefix_len=80, max_new=10)
    geometry = {"batch": {"max_tokens": 64, "max_seqs": 8}, "cache": {"block_size": 16}}

    plain = _run(model, work, "none", **geometry).last_result
    cached = _run(model, work, cache, **geometry).last_result

    assert [o.token_ids for o in plain.outputs] == [o.token_ids for o in cached.outputs]
    assert 0 == sum(o.num_cached_tokens for o in plain.outputs)
    assert sum(o.num_cached_tokens for o in cached.outputs) >= 10 * 64  # most sharers skip 4 of 5 blocks
    assert sum(s.num_tokens for s in cached.steps) < sum(s.num_tokens for s in plain.steps)


def test_a_preempted_sharer_comes_back_through_the_cache(tiny64):
    work = _shared(n_prefixes=2, per_prefix=6, prefix_len=24, max_new=24)
    geometry = {"batch": {"max_tokens": 32, "max_seqs": 8}, "cache": {"num_blocks": 30, "block_size": 4}}

    plain = _run(tiny64, work, "none", **geometry).last_result
    cached = _run(tiny64, work, "radix", **geometry).last_result

    assert cached.summary.preemptions > 0
    assert [o.token_ids for o in plain.outputs] == [o.token_ids for o in cached.outputs]
    assert any(o.num_preemptions and o.num_cached_tokens for o in cached.outputs)


SHARED = st.builds(lambda n, k, length, seed: _shared(n, k, length, seed, max_new=6),
                   st.integers(1, 3), st.integers(1, 4), st.integers(1, 30), st.integers(0, 1000))
GEOMETRY = st.sampled_from([
    {"max_tokens": 64, "max_seqs": 16, "num_blocks": 200, "block_size": 8},
    {"max_tokens": 32, "max_seqs": 8, "num_blocks": 30, "block_size": 4},  # cache pressure and preemption
    {"max_tokens": 8, "max_seqs": 4, "num_blocks": 40, "block_size": 4},  # chunked prefills past a hit
])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(work=SHARED, combo=combinations(), geometry=GEOMETRY, cache=st.sampled_from(["blocks", "radix"]),
       data=st.data())
def test_every_pipeline_shares_prefixes_without_a_race_and_with_the_same_tokens(tiny64, work, combo, geometry,
                                                                                 cache, data):
    """On `sim` (random op order, happens-before checking): the reference tokens are those of the same engine
    without a cache; no unordered access, every request ends, nothing leaks."""
    reference = [o.token_ids for o in _run(tiny64, work, "none", **_geometry(geometry)).last_result.outputs]

    check_engine(tiny64, {**combo.config(**geometry), "prefix_cache": cache}, work, data=data, reference=reference)


def _geometry(g: dict) -> dict:
    return {"batch": {"max_tokens": g["max_tokens"], "max_seqs": g["max_seqs"]},
            "cache": {"num_blocks": g["num_blocks"], "block_size": g["block_size"]}}


def test_releasing_a_shared_block_for_every_holder_is_caught(tiny64):
    """The test of the tests: when the first holder's release lets a shared block go for all (no reference
    count), a new request gets it and writes it while a sharer still reads it: the checker or the tokens say so."""

    @settings(max_examples=40, deadline=None, phases=[Phase.generate], database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(work=SHARED, combo=combinations(), data=st.data())
    def suite(work, combo, data):
        geometry = {"max_tokens": 32, "max_seqs": 8, "num_blocks": 30, "block_size": 4}
        reference = [o.token_ids for o in _run(tiny64, work, "none", **_geometry(geometry)).last_result.outputs]
        check_engine(tiny64, {**combo.config(**geometry), "prefix_cache": "radix"}, work, data=data,
                     reference=reference, debug=PipelineDebug(unshared_release=True))

    with pytest.raises(InvariantError):
        suite()


@pytest.mark.parametrize("name", list(INDEXES))
def test_everything_counted_free_can_be_allocated_after_two_requests_computed_one_prefix(name):
    """Two requests admitted in one batch both compute the same first block; only the first one's copy is
    cached, and the second offers nothing after its private copy. (It used to offer its second block as a child
    of the first one's: the radix tree then could not drop the first block although it counted as free, and a
    request got a short block table.)"""
    kv = KVBlocks(8, 2, INDEXES[name]())  # 7 blocks of 2 tokens
    kv.begin_batch(0)
    first, second = _req([1, 2, 3, 4, 9]), _req([1, 2, 5, 6, 9], 1)
    for req in (first, second):
        kv.attach(req)  # both before either is published: no hit
    _running(kv, first, 0)
    _running(kv, second, 0)

    assert 2 == kv.num_cached  # first's [1, 2] and [3, 4] ([9] is not full); none of second's
    kv.release(first, 0)
    kv.begin_batch(1)
    free = kv.num_free

    assert (7 - 3, free) == (free, len(kv.allocate(free, "new")))


def test_an_admission_whose_cached_prefix_leaves_one_token_does_not_take_a_running_decodes_block():
    """Such a request looks like a decode (one token to feed, some computed), but its admission draws on the free
    blocks, never on the decodes' reserve: the running decode keeps the block its next token needs."""
    from asyncbatch.core.pools import DeferredPool
    from asyncbatch.core.scheduling import SchedulingState

    kv = KVBlocks(6, 2, RadixTree())  # 5 blocks of 2 tokens
    kv.begin_batch(0)
    decode = _req([7, 8, 9, 10])  # 2 blocks, full: its next token needs a third
    _running(kv, decode, 0)
    decode.num_pending = 1  # its newest token is on the device: one to feed
    sharer = _req([1, 2, 3], 1)
    _running(kv, sharer, 0)  # [1, 2] cached, [3] private
    kv.release(sharer, 0)
    kv.begin_batch(1)
    hit, other = _req([1, 2, 5], 2), _req([9, 9], 3)
    for req in (hit, other):
        kv.attach(req)
    assert (2, 1) == (hit.num_computed, hit.num_remaining)  # looks like a decode

    state = SchedulingState(1, [decode], [hit, other], max_tokens=16, max_seqs=4, blocks=kv,
                            rows=DeferredPool(4, name="row"), block_size=2)
    # 3 free: the cached [1, 2], the sharer's [3], one never used; the decode reserves one of them.
    assert (3, True) == (kv.num_free, state.add(hit, 1))  # takes [1, 2] and one new block
    assert (1, False) == (kv.num_free, state.add(other, 2))  # the last free block is the decode's
    assert state.add(decode, 1)
