"""`Engine.cancel` across runs: a cancel for a request that already ended does nothing (a client that cancels after
its result came back and then reuses the id keeps its next request); one for an id no run has held yet waits for
the run that holds it. The state machine drives the engine's cancel box over real request books, without a
model, against a plain model of those rules."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.book import RequestBook
from asyncbatch.core.cancels import ENDED_IDS_KEPT, Cancels
from asyncbatch.core.requests import RequestState, Status
from asyncbatch.core.types import Request

PARAMS = SamplingParams(max_new_tokens=3, ignore_eos=True)
IDS = ("a", "b", "c", "d", "e")


def test_a_cancel_after_its_request_ended_does_not_cancel_a_later_request_of_that_id(tiny64):
    engine = Engine.from_model(tiny64, EngineConfig())
    first = engine.generate([[1, 2, 3]], PARAMS, request_ids=["a"])
    engine.cancel("a")  # the result is already back: too late, and nothing is left to cancel
    engine.cancel("b")  # no run has held "b" yet: it waits for the run that does

    again = engine.generate([[1, 2, 3], [4, 5]], PARAMS, request_ids=["a", "b"])
    assert [("a", "length", first[0].token_ids), ("b", "cancelled", ())] == \
        [(o.request_id, o.finish_reason, o.token_ids) for o in again]


def _book(ids: list[str]) -> RequestBook:
    states = [RequestState(Request(rid, (1, 2, 3), PARAMS), i, 64, seed=i) for i, rid in enumerate(ids)]
    return RequestBook(states, num_blocks=8, num_rows=4)


def _end(book: RequestBook, rid: str) -> None:
    book.finish(next(r for r in book.states if r.request_id == rid), "length", 0.0)


def test_only_the_last_kept_ended_ids_are_remembered():
    cancels = Cancels(kept=2)
    book = _book(["a", "b", "c"])
    cancels.attach(book)
    for rid in ("b", "a", "c"):  # finish order, not input order, decides which ids are the newest
        _end(book, rid)
    cancels.detach()
    for rid in ("a", "b", "c"):
        cancels.cancel(rid)

    later = _book(["a", "b", "c"])
    cancels.attach(later)
    later.apply_cancellations(1.0)
    # "b" ended first, so only its end is forgotten: its cancel waited, and cancels the later "b" alone.
    assert {"b": "cancelled"} == {o.request_id: o.finish_reason for o in later.outputs.values()}
    assert 10_000 == ENDED_IDS_KEPT  # the number the docs give


class CancelMachine(RuleBasedStateMachine):
    """Runs over a few reused ids, each ending its requests in a random order, with cancels at any moment.

    The model: a cancel for an id the current run holds marks it (a request still running then ends
    `cancelled` at the next step); one for an id among the last `kept` ended ones is dropped; any other waits and
    marks the next run that holds the id."""

    @initialize(kept=st.integers(1, 4))
    def start_engine(self, kept):
        self.cancels = Cancels(kept=kept)
        self.kept = kept
        self.book: RequestBook | None = None
        self.pending: set[str] = set()
        self.ended: list[str] = []  # oldest first, at most `kept`
        self.marked: set[str] = set()
        self.expected: dict[str, str] = {}  # the current run's ended requests and their reasons

    @rule(rid=st.sampled_from(IDS))
    def cancel(self, rid):
        self.cancels.cancel(rid)
        if self.book is not None and rid in self.book.ids:
            self.marked.add(rid)
        elif rid not in self.ended:
            self.pending.add(rid)

    @precondition(lambda self: self.book is None)
    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, unique=True))
    def start_run(self, ids):
        self.book = _book(ids)
        self.cancels.attach(self.book)
        self.marked, self.pending = self.pending & set(ids), self.pending - set(ids)
        self.expected = {}

    @precondition(lambda self: self.book is not None)
    @rule()
    def step(self):
        self.book.apply_cancellations(0.0)
        for rid in self.marked - set(self.expected):
            self.expected[rid] = "cancelled"
        self.marked = set()

    @precondition(lambda self: self.book is not None)
    @rule(data=st.data())
    def end_one(self, data):
        running = sorted(r.request_id for r in self.book.states if r.status is not Status.FINISHED)
        if running:
            rid = data.draw(st.sampled_from(running))
            _end(self.book, rid)
            self.expected[rid] = "length"

    @precondition(lambda self: self.book is not None)
    @rule()
    def end_run(self):
        self.step()
        for r in self.book.states:
            if r.status is not Status.FINISHED:
                _end(self.book, r.request_id)
                self.expected[r.request_id] = "length"
        order = [o.request_id for o in self.book.outputs.values()]
        self.cancels.detach()
        self.book = None
        self.ended = ([rid for rid in self.ended if rid not in order] + order)[-self.kept:]

    @invariant()
    def every_ended_request_has_the_reason_the_rules_give(self):
        if self.book is not None:
            assert self.expected == {o.request_id: o.finish_reason for o in self.book.outputs.values()}


TestCancels = CancelMachine.TestCase
TestCancels.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
