"""`StepRing`: steps written by one side come out of the other whole, in order, with their stats and extras, across
wrap-arounds; a step that does not fit is refused (the caller sends it by the pipe) and nothing is overwritten."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncbatch.core.stats import StepStats
from asyncbatch.core.types import Output
from asyncbatch.serve.ring import StepRing

STATS = StepStats(batch=7, slot=1, num_seqs=3, num_tokens=40, num_decode=2, padded_tokens=48, graph_replay=True,
                  schedule_s=1e-4, prepare_s=2e-4, launch_s=3e-5, wait_s=4e-3, update_s=5e-5, compute_s=None,
                  num_context=900, time_s=12.5, fresh_tokens=False)
COUNTS = (3, 32, 410, 4096, 77, 1.25, 3.5, 0.01)


def _step(i: int, n: int, *, extra: bool = False) -> tuple:
    pairs = [v for j in range(n) for v in (i + j, (i * 31 + j) % 50_000)]  # handle, token
    out = Output(f"r{i}", (1, 2), (5, 6), "length") if extra else None
    reasons, outputs = ({0: "length"}, [out]) if extra else ({}, [])
    stats = [attrs.evolve(STATS, batch=i + b) for b in range(i % 4)]  # most steps carry none
    return (float(i), i / 2, pairs, reasons, outputs, stats, COUNTS if i % 3 else None)


def _write(ring: StepRing, step: tuple) -> bool:
    seen, run_time, pairs, reasons, outputs, stats, counts = step
    if not stats and not reasons and not outputs:  # the step loop's common step
        return ring.write_tokens(seen, run_time, pairs, counts)
    extra = (reasons, outputs) if reasons or outputs else None
    return ring.write(seen, run_time, pairs, extra, stats, counts)


def test_a_step_comes_out_as_it_went_in():
    ring = StepRing(1 << 16)
    reader = StepRing(name=ring.name)
    try:
        sent = [_step(1, 32), _step(2, 0), _step(3, 5, extra=True)]
        assert all(_write(ring, s) for s in sent)
        assert sent == reader.read_all()
        assert [] == reader.read_all()
        assert [[1], [2, 3], [3, 4, 5]] == [[x.batch for x in s[5]] for s in sent]
        assert (None, True) == (sent[0][5][0].compute_s, sent[0][5][0].graph_replay)
        assert [COUNTS, COUNTS, None] == [s[6] for s in sent]  # counts go only when they changed
    finally:
        reader.close()
        ring.close(unlink=True)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 40), st.booleans(), st.integers(0, 3)), min_size=1, max_size=60))
def test_order_and_content_survive_wrapping_and_a_full_ring(sizes):
    ring = StepRing(2048)  # a few steps fit: every run wraps and fills
    reader = StepRing(name=ring.name)
    try:
        pending: list[tuple] = []  # written, not read yet
        got: list[tuple] = []
        expected: list[tuple] = []
        for i, (n, extra, reads) in enumerate(sizes):
            step = _step(i, n, extra=extra)
            if _write(ring, step):
                pending.append(step)
            else:  # refused: the reader must be behind by at least what is left
                assert pending, "an empty ring refused a step that fits it"
            for _ in range(reads):
                batch = reader.read_all()
                got += batch
                expected += pending[: len(batch)]
                pending = pending[len(batch):]
        got += reader.read_all()
        expected += pending
        assert expected == got
    finally:
        reader.close()
        ring.close(unlink=True)


def test_stats_fields_keep_their_types():
    ring = StepRing(1 << 12)
    reader = StepRing(name=ring.name)
    try:
        stats = attrs.evolve(STATS, compute_s=0.0061, graph_replay=False)
        _write(ring, (1.0, 2.0, [], {}, [], [STATS, stats], COUNTS))
        (step,) = reader.read_all()
        assert [STATS, stats] == step[5]
        got = step[5][1]
        assert [int, bool, float] == [type(got.batch), type(got.graph_replay), type(got.compute_s)]
        assert COUNTS == step[6] and int is type(step[6][0])
    finally:
        reader.close()
        ring.close(unlink=True)


def test_where_stores_may_be_reordered_the_ring_takes_nothing_and_steps_go_by_the_pipe():
    ring = StepRing(1 << 12, enabled=False)  # as on Arm
    reader = StepRing(name=ring.name)
    try:
        assert not _write(ring, _step(1, 4))
        assert not ring.write_tokens(1.0, 2.0, [7, 8], None)
        assert [] == reader.read_all()
    finally:
        reader.close()
        ring.close(unlink=True)
