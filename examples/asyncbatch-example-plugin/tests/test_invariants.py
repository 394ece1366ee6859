"""`longest_wait` against asyncbatch's invariants, with its test kit (`asyncbatch.testing`).

The kit's pytest plugin gives the fixtures (`asyncbatch_check`, `asyncbatch_tiny_model`, `asyncbatch_host`); the
host finds `longest_wait` through this package's entry point, so install the package first:
``pip install -e examples/asyncbatch-example-plugin``, then ``pytest examples/asyncbatch-example-plugin``.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from asyncbatch import SamplingParams
from asyncbatch.testing import InvariantError, engine_dict, invariant_test, workloads

# Hypothesis draws the workload, one of these configs, the built-in buffers, streams and graphs, the cache
# geometry and every execution choice of the simulated device; each example checks the four invariants.
test_longest_wait_invariants = invariant_test(
    "scheduler", "longest_wait", {"name": "longest_wait", "aging_tokens": 0.5},
    {"name": "longest_wait", "aging_tokens": 64.0}, max_examples=15)

# Without chunked prefill a request must fit one batch whole, prompt and generated tokens (a preempted request
# recomputes both): here at most 4 + 4 tokens, in batches of 8 tokens or more.
test_unchunked_longest_wait_invariants = invariant_test(
    "scheduler", {"name": "longest_wait", "chunked_prefill": False}, max_examples=10,
    workloads=workloads(max_prompt=4, max_new=4),
    geometries=st.sampled_from([{"max_tokens": 8, "max_seqs": 4, "num_blocks": 40, "block_size": 4},
                                {"max_tokens": 16, "max_seqs": 2, "num_blocks": 16, "block_size": 4}]))


def test_longest_wait_with_every_builtin_combination(asyncbatch_check):
    """Once with each combination of built-in buffers, streams and graphs, on the kit's fixed workload (stops,
    sampling, priorities, prompts split across batches, preemption)."""
    results = asyncbatch_check.component("scheduler", {"name": "longest_wait", "aging_tokens": 4.0})

    assert {"longest_wait"} == {r.engine.config.scheduler.name for r in results}
    assert 4.0 == results[0].engine.scheduler.config.aging_tokens


def test_unchunked_prompt_longer_than_a_batch_is_reported(asyncbatch_check):
    """The limit of `chunked_prefill: false`: a prompt longer than `batch.max_tokens` can never be scheduled, and
    the check says which request and why."""
    config = engine_dict("double", "three", "per_slot", {"name": "longest_wait", "chunked_prefill": False},
                         max_tokens=8)
    work = [([1, 2, 3], SamplingParams(max_new_tokens=2)), (list(range(20)), SamplingParams(max_new_tokens=2))]

    with pytest.raises(InvariantError) as failed:
        asyncbatch_check(config, work)

    assert "every request ends" == failed.value.invariant
    assert "request '1' ended 'error'" in failed.value.details
    assert "does not fit one batch (batch.max_tokens=8)" in failed.value.details
