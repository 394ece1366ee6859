"""Hypothesis strategies shared by the test suite: requests, workloads, engine combinations, schedules."""

from __future__ import annotations

from hypothesis import strategies as st

from asyncbatch import SamplingParams

VOCAB = 512
BUFFERS = ["single", "double", {"name": "n_slot", "num_slots": 3}, {"name": "n_slot", "num_slots": 4}]
STREAMS = ["one", "two", "three"]
GRAPHS = ["eager", "per_slot", "staged", "mixed"]
SCHEDULERS = ["fifo", "prefill_first", "shortest_first", "priority"]


def sampling_params(max_new: int = 12, allow_sampling: bool = True, stop_ids: bool = True) -> st.SearchStrategy:
    temperature = st.sampled_from([0.0, 0.7, 1.3]) if allow_sampling else st.just(0.0)
    return st.builds(
        SamplingParams,
        max_new_tokens=st.integers(1, max_new),
        temperature=temperature,
        top_k=st.sampled_from([0, 0, 5, 50]),
        top_p=st.sampled_from([1.0, 1.0, 0.9]),
        stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=12).map(tuple) if stop_ids else st.just(()),
        seed=st.integers(0, 2**40),
        priority=st.integers(0, 3),
    )


@st.composite
def workloads(draw, min_requests: int = 1, max_requests: int = 10, max_prompt: int = 40, max_new: int = 12,
              allow_sampling: bool = True) -> list[tuple[list[int], SamplingParams]]:
    n = draw(st.integers(min_requests, max_requests))
    prompts = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=max_prompt), min_size=n,
                            max_size=n))
    params = draw(st.lists(sampling_params(max_new, allow_sampling), min_size=n, max_size=n))
    return list(zip(prompts, params))


def engine_dict(buffers, streams, graphs, scheduler, *, max_tokens=32, max_seqs=8, num_blocks=48, block_size=4,
                runtime="sim") -> dict:
    # `mixed` captures steps holding prefill chunks only with an attention launch fixed by padded counts.
    attention = {"name": "sdpa", "static_shapes": True} if graphs == "mixed" else "auto"
    return {
        "model": {"preset": "tiny", "dtype": "float64", "device": "cpu"},
        "runtime": runtime, "buffers": buffers, "streams": streams, "graphs": graphs, "scheduler": scheduler,
        "attention": attention, "batch": {"max_tokens": max_tokens, "max_seqs": max_seqs},
        "cache": {"num_blocks": num_blocks, "block_size": block_size},
    }


combinations = st.tuples(st.sampled_from(BUFFERS), st.sampled_from(STREAMS), st.sampled_from(GRAPHS),
                         st.sampled_from(SCHEDULERS))

# Cache geometries: roomy, tight enough to force preemption, and small token budgets forcing chunked prefill.
geometries = st.sampled_from([
    {"max_tokens": 64, "max_seqs": 16, "num_blocks": 200, "block_size": 8},
    {"max_tokens": 32, "max_seqs": 8, "num_blocks": 30, "block_size": 4},
    {"max_tokens": 8, "max_seqs": 4, "num_blocks": 40, "block_size": 4},
    {"max_tokens": 16, "max_seqs": 2, "num_blocks": 16, "block_size": 4},
])


class DataChooser:
    """Lets hypothesis pick every scheduling choice of the `sim` runtime (and shrink them)."""

    def __init__(self, data) -> None:
        self.data = data

    def choose(self, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1)) if n > 1 else 0
