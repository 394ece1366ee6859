"""One run served by several ranks: each replica runs its share, rank 0 merges the results.

A replica is one rank, or a tensor-parallel group of ranks that all run the same requests and produce the same
outputs (the group's first rank speaks for it). The merged result reads like a single engine's: outputs in input
order, the summary over all of them with the longest rank's wall time (the ranks run side by side, started
together by a barrier), every replica's steps, and the mean compute busy fraction over every rank.
`RankSummary` keeps each rank's own numbers for results.json.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ..core.stats import RunSummary
from .router import assign, request_cost
from .world import World


@attrs.frozen
class RankSummary:
    rank: int
    replica: int
    num_requests: int
    generated_tokens: int
    wall_s: float
    tokens_per_s: float
    compute_busy_fraction: float | None


def run_replicated(engine: Any, requests: Sequence[Any], world: World, *, context: Any,
                   on_token: Callable | None = None) -> tuple[Any, list[RankSummary]]:
    """Run this rank's replica's share of `requests` on `engine`. Rank 0 returns the merged RunResult and every
    rank's summary; the other ranks return their own result and no summaries. Every rank must call it with the
    same requests."""
    from ..core.engine import RunResult

    owners = assign([request_cost(len(r.prompt_ids), r.params.max_new_tokens) for r in requests], world.data)
    mine = [i for i, owner in enumerate(owners) if owner == world.replica]
    world.barrier()  # the replicas' clocks start together
    result = engine.run([requests[i] for i in mine], context=attrs.evolve(context, num_requests=len(mine)),
                        on_token=on_token)
    # A tensor-parallel group's other ranks hold the same outputs and steps as its first: they send only their
    # summary, not a second copy of every token for rank 0 to unpickle and drop.
    parts = world.gather((mine, result if world.tp_rank == 0 else attrs.evolve(result, outputs=[], steps=[])))
    if parts is None:
        return result, []
    outputs: list[Any] = [None] * len(requests)
    steps, ranks = [], []
    for rank, (indices, part) in enumerate(parts):
        s = part.summary
        ranks.append(RankSummary(rank, rank // world.tensor, len(indices), s.generated_tokens, s.wall_s,
                                 s.tokens_per_s, s.compute_busy_fraction))
        if rank % world.tensor:
            continue  # a tensor-parallel group's other ranks sent their summary alone
        for i, out in zip(indices, part.outputs, strict=True):
            outputs[i] = out
        steps.extend(part.steps)
    summaries = [p.summary for _, p in parts]
    firsts = summaries[::world.tensor]
    busy = [s.compute_busy_fraction for s in summaries if s.compute_busy_fraction is not None]
    summary = RunSummary.build(
        outputs, steps, max(s.wall_s for s in summaries), busy_fraction=sum(busy) / len(busy) if busy else None,
        preemptions=sum(s.preemptions for s in firsts), hook_errors=sum(s.hook_errors for s in summaries),
        startup_s=max((s.startup_s or 0.0) for s in summaries))
    return RunResult(outputs, summary, steps), ranks
