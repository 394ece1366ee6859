"""Cache-aware schedulers (`longest_prefix_first`, `fair_prefix`): the order they admit in, the budgets they keep,
`fair_prefix`'s bound on overtaking, and token identity under every pipeline.

The unit tests build `SchedulingState` by hand, as the engine does: a waiting request with a cached prefix has it
attached before `schedule` runs (`num_cached == num_computed`, the prefix's blocks in `req.blocks`). The
pipeline-wide invariants (no race, every request ends, reference tokens) are checked by tests/test_pipeline_sim.py,
whose combinations include every built-in scheduler; the tests here add a hypothesis run per scheduler through
the test kit and a check against `fifo` planning on the same states.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncbatch import ConfigError, Engine, EngineConfig, SamplingParams
from asyncbatch.core.pools import DeferredPool
from asyncbatch.core.requests import RequestState
from asyncbatch.core.scheduling import SchedulingState
from asyncbatch.core.types import Request
from asyncbatch.strategies.cache_aware import FairPrefix, FairPrefixConfig, LongestPrefixFirst
from asyncbatch.strategies.schedulers import Fifo
from asyncbatch.testing import FIXED_GEOMETRY, check_component, component_specs, invariant_test

BS = 4  # block size of the hand-built states
_CACHED_BLOCK_IDS = itertools.count(10_000)  # ids of prefix-cache blocks: never in the test's free pool
_CONTENT = itertools.count(1)
SHARED = tuple(range(50_000, 50_040))  # a 40-token prefix for requests that share one (10 blocks)


def make(name: str, prompt_len: int, *, cached: int = 0, arrival: float = 0.0, index: int = 0,
         shared: int = 0) -> RequestState:
    """A new request; its prompt starts with `shared` tokens of `SHARED`, the rest is its own."""
    base = 1000 * next(_CONTENT)
    prompt = SHARED[:shared] + tuple(range(base, base + prompt_len - shared))
    req = RequestState(Request(name, prompt, SamplingParams(max_new_tokens=4), arrival), index, max_len=4096, seed=0)
    attach(req, cached)
    return req


def attach(req: RequestState, cached: int) -> None:
    """What the engine does for a waiting request before `schedule`: attach its cached prefix (whole blocks)."""
    assert cached % BS == 0 and cached < req.prompt_len
    req.num_cached = req.num_computed = cached
    req.blocks = [next(_CACHED_BLOCK_IDS) for _ in range(cached // BS)]
    req.block_last_use = [-1] * len(req.blocks)


class CachedState(SchedulingState):
    """A planning state that says a prefix cache serves the run (what `defer_shared` waits for); the cached
    prefixes themselves are attached by hand (`attach`)."""

    prefix_cache_on = True


def state_for(batch: int, waiting: list[RequestState], running: list[RequestState] = (), *, max_tokens: int = 256,
              max_seqs: int = 16, num_blocks: int = 256, num_rows: int = 16, cache: bool = False) -> SchedulingState:
    return (CachedState if cache else SchedulingState)(
        batch, running, sorted(waiting, key=lambda r: (r.arrival_time, r.index)), max_tokens=max_tokens,
        max_seqs=max_seqs, block_size=BS, blocks=DeferredPool(num_blocks, name="block"),
        rows=DeferredPool(num_rows, name="row"))


def plan(scheduler, state: SchedulingState) -> list[tuple[str, int]]:
    scheduler.schedule(state)
    return [(e.req.request_id, e.num_tokens) for e in state.entries]


SCHEDULERS = [LongestPrefixFirst, FairPrefix]


# ---------------------------------------------------------------- order


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_waiting_requests_are_admitted_by_cached_prefix_length(cls):
    waiting = [make("none", 20, index=0), make("long", 40, cached=32, index=1), make("mid", 24, cached=16, index=2),
               make("short", 12, cached=4, index=3)]
    state = state_for(0, waiting)

    assert plan(cls(), state) == [("long", 8), ("mid", 8), ("short", 8), ("none", 20)]
    assert [state.cached_tokens(r) for r in waiting] == [0, 32, 16, 4]
    assert all(e.admitted and e.samples for e in state.entries)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_ties_go_in_arrival_order_then_input_order(cls):
    waiting = [make("c", 20, cached=8, arrival=2.0, index=0), make("a", 20, cached=8, arrival=1.0, index=2),
               make("b", 20, cached=8, arrival=1.0, index=3), make("z", 20, cached=0, arrival=0.0, index=1)]
    assert [name for name, _ in plan(cls(), state_for(0, waiting))] == ["a", "b", "c", "z"]


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_decodes_then_running_prefills_then_waiting(cls):
    sched = cls()
    decoding, split = make("decoding", 6, index=0), make("split", 30, index=1)
    first = state_for(0, [decoding, split], max_tokens=16)
    assert plan(sched, first) == [("decoding", 6), ("split", 10)]  # the token budget splits the second prompt
    assert decoding.is_decode and split.is_prefill

    newcomer = make("newcomer", 20, cached=16, arrival=1.0, index=2)
    second = state_for(1, [newcomer], [decoding, split], max_tokens=16)
    # The cache hit is cheap, but already-admitted work goes first; the newcomer gets what budget is left.
    assert plan(sched, second) == [("decoding", 1), ("split", 15)]
    third = state_for(2, [newcomer], [decoding, split], max_tokens=16)
    assert plan(sched, third) == [("decoding", 1), ("split", 5), ("newcomer", 4)]


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_budgets_are_respected(cls):
    waiting = [make(f"r{i}", 16 + 4 * i, cached=4 * i, index=i) for i in range(6)]
    # Token budget: the longest-cached request is chunked and takes it all.
    state = state_for(0, waiting, max_tokens=8)
    assert plan(cls(), state) == [("r5", 8)]
    assert state.token_budget == 0
    # Row budget: two sequences.
    state = state_for(0, [make(f"r{i}", 16 + 4 * i, cached=4 * i, index=i) for i in range(6)], max_seqs=2)
    assert plan(cls(), state) == [("r5", 16), ("r4", 16)]
    # Chunking off: a prompt that does not fit the token budget whole is not admitted, and nothing overtakes it.
    sched = cls(cls.Config(chunked_prefill=False))
    state = state_for(0, [make("big", 40, cached=8, index=0), make("small", 8, index=1)], max_tokens=16)
    assert plan(sched, state) == []


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_a_request_that_does_not_fit_is_not_overtaken_by_a_lower_ranked_one(cls):
    """Admission stops at the first refusal (as in `fifo`): blocks for the whole prompt are lacking for `huge`."""
    waiting = [make("small", 8, index=0), make("huge", 200, cached=16, index=1)]
    state = state_for(0, waiting, num_blocks=20)
    assert plan(cls(), state) == []
    assert state.num_refused == 1


# ---------------------------------------------------------------- without a prefix cache: fifo's plan


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(1, 40), st.sampled_from([0, 8, 40])), min_size=1, max_size=10),
       arrivals=st.data(),
       max_tokens=st.integers(1, 64), max_seqs=st.integers(1, 8), num_blocks=st.integers(1, 40),
       chunked=st.booleans())
def test_without_cached_tokens_the_plan_is_fifos(prompts, arrivals, max_tokens, max_seqs, num_blocks, chunked):
    """Nothing cached: both schedulers plan exactly what `fifo` plans, batch after batch (whatever the prompts
    share: without a prefix cache `defer_shared` does nothing, and only `cached_tokens` matters)."""
    times = arrivals.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=len(prompts), max_size=len(prompts)))
    plans = []
    for sched in (Fifo(Fifo.Config(chunked)), LongestPrefixFirst(LongestPrefixFirst.Config(chunked)),
                  FairPrefix(FairPrefixConfig(max_skips=1, chunked_prefill=chunked))):
        waiting = [make(f"r{i}", n, arrival=t, index=i, shared=min(n, shared))
                   for i, ((n, shared), t) in enumerate(zip(prompts, times))]
        steps = []
        for k in range(4):
            state = state_for(k, [r for r in waiting if r.row is None], [r for r in waiting if r.row is not None
                                                                           and r.num_remaining],
                              max_tokens=max_tokens, max_seqs=max_seqs, num_blocks=num_blocks)
            steps.append(plan(sched, state))
        plans.append(steps)
    assert plans[0] == plans[1] == plans[2]


# ---------------------------------------------------------------- defer_shared


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_defer_shared_holds_back_a_request_that_would_recompute_a_block_being_computed(cls):
    def queue():
        return [make("first", 24, shared=16, index=0), make("sibling", 24, shared=16, index=1),
                make("other", 8, index=2), make("short_share", 24, shared=3, index=3)]

    waiting = queue()  # no prefix cache: nothing to wait for
    assert [n for n, _ in plan(cls(), state_for(0, waiting))] == ["first", "sibling", "other", "short_share"]
    waiting = queue()
    off = cls(cls.Config(defer_shared=False))
    assert [n for n, _ in plan(off, state_for(0, waiting, cache=True))] == ["first", "sibling", "other", "short_share"]

    sched = cls()  # defer_shared is on by default
    waiting = queue()
    # `sibling` would compute the 4 blocks `first` computes now; sharing 3 tokens (not a whole block) is no reason.
    assert [n for n, _ in plan(sched, state_for(0, waiting, cache=True))] == ["first", "other", "short_share"]
    sibling = waiting[1]
    attach(sibling, 16)  # next batch the cache supplies them
    assert plan(sched, state_for(1, [sibling], cache=True)) == [("sibling", 8)]


def test_defer_shared_compares_past_the_cached_tokens():
    """Both hold 8 cached tokens of the shared prefix: the sibling is deferred only while a request admitted in
    the batch computes a further whole block it would compute too."""
    sched = LongestPrefixFirst(LongestPrefixFirst.Config(defer_shared=True))
    a, b = make("a", 24, shared=16, cached=8, index=0), make("b", 24, shared=16, cached=8, index=1)
    assert [n for n, _ in plan(sched, state_for(0, [a, b], cache=True))] == ["a"]
    a, b = make("a", 24, shared=8, cached=8, index=0), make("b", 24, shared=8, cached=8, index=1)
    assert [n for n, _ in plan(sched, state_for(0, [a, b], cache=True))] == ["a", "b"]


def test_fair_prefix_never_defers_a_due_request():
    sched = FairPrefix(FairPrefixConfig(max_skips=0, defer_shared=True))  # every request is due: fifo order
    waiting = [make("first", 24, shared=16, index=0), make("sibling", 24, shared=16, index=1)]
    assert [n for n, _ in plan(sched, state_for(0, waiting, cache=True))] == ["first", "sibling"]


# ---------------------------------------------------------------- fair_prefix's bound


def test_longest_prefix_first_can_starve_and_fair_prefix_bounds_it():
    """One row a batch; a fresh cache hit arrives every batch. `longest_prefix_first` never admits the uncached
    request; `fair_prefix` admits it once it has been overtaken `max_skips` times."""
    def run(sched, batches: int = 8) -> list[str]:
        cold = make("cold", 20, index=0)
        admitted = []
        for k in range(batches):
            hit = make(f"hit{k}", 20, cached=16, arrival=float(k + 1), index=k + 1)
            state = state_for(k, [r for r in (cold, hit) if r.row is None], max_seqs=1)
            admitted += [name for name, _ in plan(sched, state)]
        return admitted

    assert "cold" not in run(LongestPrefixFirst())
    assert run(FairPrefix(FairPrefixConfig(max_skips=3))).index("cold") == 3
    assert run(FairPrefix(FairPrefixConfig(max_skips=0)))[0] == "cold"  # 0: fifo order


def test_fair_prefix_forgets_admitted_and_departed_requests():
    sched = FairPrefix(FairPrefixConfig(max_skips=5))
    cold, gone, hit = make("cold", 20, index=0), make("gone", 20, index=1), make("hit", 20, cached=16, index=2)
    plan(sched, state_for(0, [cold, gone, hit], max_seqs=1))
    assert sched.skips == {"cold": 1, "gone": 1}
    plan(sched, state_for(1, [cold], max_seqs=1))  # `gone` was cancelled; `cold` is admitted
    assert sched.skips == {}


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_fair_prefix_config_is_validated_eagerly(value):
    with pytest.raises(ValueError, match="max_skips"):
        FairPrefixConfig(max_skips=value)
    with pytest.raises(ConfigError, match="max_skips"):
        EngineConfig.from_dict({"scheduler": {"name": "fair_prefix", "max_skips": value}})


def test_both_are_registered_with_their_configs():
    config = EngineConfig.from_dict({"scheduler": {"name": "fair_prefix", "max_skips": 2}})
    assert config.scheduler.config == FairPrefixConfig(max_skips=2)
    config = EngineConfig.from_dict({"scheduler": "longest_prefix_first"})
    assert config.scheduler.name == "longest_prefix_first"
    assert {"longest_prefix_first", "fair_prefix"} <= set(component_specs("scheduler"))


@st.composite
def batch_sequences(draw):
    """Batches of arrivals (prompt length, tokens shared with the common prefix), geometries, and a seed for departures (cancellations) and the cached
    length of every waiting request in every batch (the cache's contents change between batches)."""
    return draw(st.lists(st.tuples(
        st.lists(st.tuples(st.integers(1, 40), st.sampled_from([0, 4, 12, 40])), max_size=4),  # (prompt, shared)
        st.integers(1, 4),  # max_seqs
        st.integers(1, 64),  # max_tokens
        st.integers(1, 30),  # free blocks
        st.integers(0, 2**16),  # seed for cached lengths and departures
    ), min_size=1, max_size=25))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batch_sequences(), max_skips=st.integers(0, 4), chunked=st.booleans(), defer=st.booleans())
def test_fair_prefix_never_lets_a_request_be_overtaken_more_than_max_skips_times(batches, max_skips, chunked, defer):
    """The docstring's guarantee, counted independently of the scheduler: a waiting request is overtaken in a batch
    when it stays waiting while a later arrival is admitted in it; no request is overtaken in more than
    `max_skips` batches."""
    import random

    sched = FairPrefix(FairPrefixConfig(max_skips=max_skips, chunked_prefill=chunked, defer_shared=defer))
    waiting: list[RequestState] = []
    overtaken: dict[str, int] = {}
    index = itertools.count()
    for k, (arrivals, max_seqs, max_tokens, num_blocks, seed) in enumerate(batches):
        rng = random.Random(seed)
        for prompt, shared in arrivals:
            i = next(index)
            waiting.append(make(f"r{i}", prompt, arrival=float(k // 2), index=i, shared=min(prompt, shared)))
        waiting = [r for r in waiting if rng.random() > 0.1]  # cancellations
        for req in waiting:  # the cache's contents change: re-attach a random prefix (whole blocks, < prompt)
            attach(req, BS * rng.randint(0, (req.prompt_len - 1) // BS))
        state = state_for(k, waiting, max_tokens=max_tokens, max_seqs=max_seqs, num_blocks=num_blocks, cache=True)
        sched.schedule(state)

        admitted = [e.req for e in state.entries if e.admitted]
        latest = max(((r.arrival_time, r.index) for r in admitted), default=None)
        waiting = [r for r in waiting if r not in admitted]
        for req in waiting:
            if latest is not None and (req.arrival_time, req.index) < latest:
                overtaken[req.request_id] = overtaken.get(req.request_id, 0) + 1
        assert max(overtaken.values(), default=0) <= max_skips, (k, overtaken)


# ---------------------------------------------------------------- the pipeline's invariants, through the test kit


test_longest_prefix_first_invariants = invariant_test("scheduler", "longest_prefix_first", max_examples=10)
test_fair_prefix_invariants = invariant_test("scheduler", {"name": "fair_prefix", "max_skips": 0},
                                             {"name": "fair_prefix", "max_skips": 2}, max_examples=10)


@pytest.mark.parametrize("spec", ["longest_prefix_first", {"name": "fair_prefix", "max_skips": 1}])
def test_check_component_with_every_builtin_pipeline(tiny64, spec):
    """Every buffer policy x stream topology x graph policy on the kit's fixed workload (stops, sampling,
    preemption): no race, every request ends, the reference tokens."""
    results = check_component(tiny64, "scheduler", spec, geometry=FIXED_GEOMETRY)
    assert len(results) == 4 * 3 * 4


# ---------------------------------------------------------------- end to end with the prefix cache


def _shared_prefix_workload() -> list[list[int]]:
    """3 prefixes of 64 tokens x 6 questions, interleaved: consecutive arrivals alternate between prefixes."""
    prefixes = [[(97 * p + 13 * j + 5) % 500 + 3 for j in range(64)] for p in range(3)]
    return [prefixes[p] + [(31 * q + 7 * p + j) % 500 + 3 for j in range(4 + q)] for q in range(6) for p in range(3)]


GEOMETRIES = {  # batch and cache geometries (block_size 16: each prefix is 4 blocks, each request 5 or 6)
    "roomy": {"batch": {"max_tokens": 96, "max_seqs": 4}, "cache": {"block_size": 16, "num_blocks": 64}},
    # Room for about one prefix: arrival order evicts each prefix before its next question comes.
    "tight": {"batch": {"max_tokens": 96, "max_seqs": 1}, "cache": {"block_size": 16, "num_blocks": 12}},
    # Two rows: ranked by cached tokens, the last prefix's first two questions tie on 0 and share a batch.
    "siblings": {"batch": {"max_tokens": 160, "max_seqs": 2}, "cache": {"block_size": 16, "num_blocks": 20}},
}
CACHE_AWARE = {"longest_prefix_first-nodefer": {"name": "longest_prefix_first", "defer_shared": False},
               "longest_prefix_first": "longest_prefix_first",
               "fair_prefix-nodefer": {"name": "fair_prefix", "max_skips": 2, "defer_shared": False},
               "fair_prefix": {"name": "fair_prefix", "max_skips": 2}}


@pytest.mark.parametrize("prefix_cache", ["blocks", "radix"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_cache_aware_schedulers_hit_the_cache_at_least_as_often_as_fifo(model_factory, prefix_cache, geometry):
    """Same greedy tokens as `fifo` (float64), and at least as many prompt tokens from the prefix cache; strictly
    more where the cache holds about one prefix. Without `defer_shared`, siblings admitted together both miss
    (the `siblings` geometry), so there only the deferring variants are held to fifo's hit count."""
    model = model_factory("tiny", "float64")
    prompts, params = _shared_prefix_workload(), SamplingParams(max_new_tokens=6)

    def run(scheduler) -> tuple[list[tuple[int, ...]], int]:
        config = EngineConfig.from_dict({
            "model": {"preset": "tiny", "dtype": "float64", "device": "cpu"}, "runtime": "cpu",
            "scheduler": scheduler, "prefix_cache": prefix_cache, **GEOMETRIES[geometry]})
        outputs = Engine.from_model(model, config).generate(prompts, params)
        assert {o.finish_reason for o in outputs} == {"length"}
        return [o.token_ids for o in outputs], sum(o.num_cached_tokens for o in outputs)

    tokens, fifo_hits = run("fifo")
    assert fifo_hits > 0
    for label, scheduler in CACHE_AWARE.items():
        if geometry == "siblings" and "nodefer" in label:
            continue
        got, hits = run(scheduler)
        assert got == tokens, label
        assert hits >= fifo_hits, (label, hits, fifo_hits)
        if geometry == "tight" and label.startswith("longest_prefix_first"):
            assert hits > fifo_hits, (label, hits, fifo_hits)
