"""Built-in schedulers. Pure Python: no torch, no streams, no events (they run under every pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs

from ..core.interfaces import Scheduler
from ..core.requests import RequestState
from ..core.scheduling import PendingView, SchedulingState
from ..core.scheduling import add_decodes as _add_decodes
from ..core.scheduling import add_prefills as _add_prefills


@attrs.frozen
class FifoConfig:
    """`chunked_prefill`: split prompts that exceed the remaining token budget across batches."""

    chunked_prefill: bool = True


class Fifo(Scheduler):
    """Decode first, then unfinished prefills, then new requests in arrival order (chunked prefill)."""

    Config = FifoConfig

    def __init__(self, config: FifoConfig | None = None) -> None:
        self.config = config or FifoConfig()

    def schedule(self, state: SchedulingState) -> None:
        _add_decodes(state, state.running)
        _add_prefills(state, (r for r in state.running if r.is_prefill), self.config.chunked_prefill,
                      stop_at_first_refusal=False)
        _add_prefills(state, state.waiting, self.config.chunked_prefill, stop_at_first_refusal=True)


@attrs.frozen
class PrefillFirstConfig:
    chunked_prefill: bool = True


class PrefillFirst(Scheduler):
    """Prefills (unfinished, then new in arrival order) before decodes: lower time to first token."""

    Config = PrefillFirstConfig

    def __init__(self, config: PrefillFirstConfig | None = None) -> None:
        self.config = config or PrefillFirstConfig()

    def schedule(self, state: SchedulingState) -> None:
        _add_prefills(state, (r for r in state.running if r.is_prefill), self.config.chunked_prefill,
                      stop_at_first_refusal=False)
        _add_prefills(state, state.waiting, self.config.chunked_prefill, stop_at_first_refusal=True)
        _add_decodes(state, state.running)


@attrs.frozen
class ShortestFirstConfig:
    chunked_prefill: bool = True


class ShortestFirst(Scheduler):
    """Decode first; new requests by fewest prompt tokens first (shortest job first for prefill)."""

    Config = ShortestFirstConfig

    def __init__(self, config: ShortestFirstConfig | None = None) -> None:
        self.config = config or ShortestFirstConfig()

    def schedule(self, state: SchedulingState) -> None:
        _add_decodes(state, state.running)
        _add_prefills(state, (r for r in state.running if r.is_prefill), self.config.chunked_prefill,
                      stop_at_first_refusal=False)
        by_length = sorted(state.waiting, key=lambda r: (r.num_remaining, r.arrival_time))
        _add_prefills(state, by_length, self.config.chunked_prefill, stop_at_first_refusal=False)


@attrs.frozen
class PriorityConfig:
    """Higher `SamplingParams.priority` first; ties by arrival. Preemption takes the lowest priority first."""

    chunked_prefill: bool = True


class Priority(Scheduler):
    """Strict priority order over running and waiting requests; lowest priority is preempted first."""

    Config = PriorityConfig

    def __init__(self, config: PriorityConfig | None = None) -> None:
        self.config = config or PriorityConfig()

    def schedule(self, state: SchedulingState) -> None:
        ranked = sorted((*state.running, *state.waiting), key=lambda r: (-r.priority, r.arrival_time))
        for req in ranked:
            if state.token_budget == 0 or state.seq_budget == 0:
                return
            n = 1 if req.is_decode else (state.max_chunk(req) if self.config.chunked_prefill else req.num_remaining)
            if n > 0:
                state.add(req, n)

    def preemption_victim(self, candidates: Sequence[RequestState]) -> RequestState:
        return min(candidates, key=lambda r: (r.priority, -r.admit_order))


@attrs.frozen
class StopAwareConfig:
    """`fresh`: when to read every in-flight token before planning. `stops`: only while a running request could
    end early (it has stop ids, the checkpoint's EOS included unless ignored); `always`: every step (the synchronous loop's view, with
    the overlap given up each step)."""

    fresh: Literal["stops", "always"] = "stops"
    chunked_prefill: bool = True


class StopAware(Scheduler):
    """FIFO order, planned on fresh tokens: never schedules a request whose stop token is still in flight.

    With S slots a stop token sampled in batch k is read only after batches k+1..k+S-1 were planned, which
    may each give the stopped request a wasted row (its extra tokens are dropped). This scheduler asks the
    pipeline for fresh tokens instead, trading the overlap of those steps for no wasted rows: a research
    baseline for what the pending-token lag costs.
    """

    Config = StopAwareConfig

    def __init__(self, config: StopAwareConfig | None = None) -> None:
        self.config = config or StopAwareConfig()

    def needs_fresh_tokens(self, view: PendingView) -> bool:
        if self.config.fresh == "always":
            return True
        return any(r.num_pending and r.stop_ids for r in view.running)  # stop ids include the EOS unless ignored

    def schedule(self, state: SchedulingState) -> None:
        _add_decodes(state, state.running)
        _add_prefills(state, (r for r in state.running if r.is_prefill), self.config.chunked_prefill,
                      stop_at_first_refusal=False)
        _add_prefills(state, state.waiting, self.config.chunked_prefill, stop_at_first_refusal=True)
