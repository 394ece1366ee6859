"""Which replica serves which request: least outstanding tokens, decided before the run.

A pure function of the requests (no torch, no clock), so every rank computes the same assignment on its own.
Requests are taken in input order (arrival order for the workloads); each goes to the replica with the fewest
tokens assigned so far, counting a request as its prompt plus its `max_new_tokens` (ties: the lowest rank).
"""

from __future__ import annotations

from collections.abc import Sequence


def request_cost(prompt_len: int, max_new_tokens: object) -> int:
    """Tokens a request puts on its replica: every prompt token is prefilled, every output token decoded. A
    `max_new_tokens` that is not an int counts as 0: its request fails alone, on its replica, with the reason."""
    return prompt_len + (max_new_tokens if type(max_new_tokens) is int else 0)


def assign(costs: Sequence[int], replicas: int) -> list[int]:
    """The replica of each request, in order. Greedy least-loaded: no replica ends more than one request's cost
    above the least loaded one."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    load = [0] * replicas
    owners = []
    for cost in costs:
        r = min(range(replicas), key=lambda i: (load[i], i))
        owners.append(r)
        load[r] += cost
    return owners
