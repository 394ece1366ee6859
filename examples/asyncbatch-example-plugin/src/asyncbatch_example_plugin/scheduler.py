"""`longest_wait`: aged shortest-prompt-first admission. Short prompts go first, but waiting earns credit, so
nothing starves.

Pure Python and public API only (`asyncbatch.Scheduler`, `SchedulingState.add`): no torch, no streams, no events,
so it runs unchanged under every buffer policy, stream topology and graph policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from asyncbatch import Scheduler

if TYPE_CHECKING:
    from asyncbatch import SchedulingState


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
class LongestWaitConfig:
    """`aging_tokens`: how many prompt tokens one scheduling step of waiting is worth. A waiting request's score
    is ``steps_waited * aging_tokens - prompt_tokens``; the highest score is admitted first, so requests that
    arrived together go shortest first. Between requests that arrived at different steps, small values favour
    short prompts; large values approach arrival order (fifo). A long prompt overtakes fresh short ones once it has
    waited ``(long - short) / aging_tokens`` steps more, so nothing starves.
    `chunked_prefill`: split prompts that exceed the remaining token budget across batches."""

    aging_tokens: float = attrs.field(default=16.0, validator=_positive)
    chunked_prefill: bool = True


class LongestWait(Scheduler):
    """Decode first, then admit the waiting request that waited longest relative to its prompt length.

    Prompts already admitted but split across batches continue before new ones. Among requests that arrived
    together the shortest prompt goes first; each step of waiting earns `aging_tokens`, so nothing starves.
    """

    Config = LongestWaitConfig

    def __init__(self, config: LongestWaitConfig | None = None) -> None:
        self.config = config or LongestWaitConfig()
        self._tick = 0  # schedule() calls so far: the clock waits are measured in (monotonic across runs)
        self._first_seen: dict[int, tuple[Any, int]] = {}  # id(request) -> (request, tick it was first seen waiting)

    def score(self, req: Any) -> float:
        """Admission score of a waiting request: `aging_tokens` per step waited (this one included), minus the
        prompt tokens it still has to feed."""
        _, since = self._first_seen[id(req)]
        return (self._tick - since + 1) * self.config.aging_tokens - req.num_remaining

    def schedule(self, state: SchedulingState) -> None:
        self._tick += 1
        # Remember when each waiting request was first seen; forget the ones that left the queue. The dict keeps
        # the request itself so that its id cannot be reused while it is remembered.
        seen = {id(r): self._first_seen.get(id(r), (r, self._tick)) for r in state.waiting}
        self._first_seen = seen

        for req in state.running:  # decodes first: one token each keeps inter-token latency low
            if state.seq_budget == 0 or state.token_budget == 0:
                return
            if req.is_decode:
                state.add(req, 1)
        for req in state.running:  # then prompts already admitted and split across batches
            if state.seq_budget == 0 or state.token_budget == 0:
                return
            if req.is_prefill:
                state.add(req, self._chunk(state, req))
        ranked = sorted(state.waiting, key=lambda r: (-self.score(r), self._first_seen[id(r)][1], r.arrival_time))
        for req in ranked:
            if state.seq_budget == 0 or state.token_budget == 0:
                return
            if not req.is_schedulable:  # preempted, its last tokens still on the device: not ready to re-enter
                continue
            n = self._chunk(state, req)
            if n < 1 or not state.add(req, n):
                # Keep the ranking: a request that does not fit yet is not overtaken (it would starve otherwise).
                return

    def _chunk(self, state: SchedulingState, req: Any) -> int:
        return state.max_chunk(req) if self.config.chunked_prefill else req.num_remaining
