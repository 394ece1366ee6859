"""Hypothesis strategies: sampling parameters, workloads, engine combinations, cache geometries.

Needs hypothesis (the `test` extra). A workload is a list of ``(prompt_ids, SamplingParams)`` pairs, the shape
`check_engine` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from hypothesis import strategies as st

from ..core.types import SamplingParams
from .combos import FIELDS, GEOMETRIES, Combination, Spec, family_choices

if TYPE_CHECKING:
    from ..core.plugin_host import PluginHost

#: Vocabulary size of the `tiny` preset: token ids are drawn below it.
VOCAB = 512

Workload = list[tuple[list[int], SamplingParams]]


def sampling_params(max_new: int = 12, allow_sampling: bool = True, stop_ids: bool = True, *,
                    vocab: int = VOCAB) -> st.SearchStrategy[SamplingParams]:
    """Valid `SamplingParams`: 1..`max_new` new tokens; greedy or (with `allow_sampling`) temperature 0.7 / 1.3
    with top-k and top-p filters; up to 12 stop ids (with `stop_ids`); always a seed, so that sampled tokens are
    comparable with a reference; priorities 0..3."""
    temperature = st.sampled_from([0.0, 0.7, 1.3]) if allow_sampling else st.just(0.0)
    return st.builds(
        SamplingParams,
        max_new_tokens=st.integers(1, max_new),
        temperature=temperature,
        top_k=st.sampled_from([0, 0, 5, 50]),
        top_p=st.sampled_from([1.0, 1.0, 0.9]),
        stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=12).map(tuple) if stop_ids else st.just(()),
        seed=st.integers(0, 2**40),
        priority=st.integers(0, 3),
    )


def workloads(min_requests: int = 1, max_requests: int = 10, max_prompt: int = 40, max_new: int = 12,
              allow_sampling: bool = True, *, vocab: int = VOCAB) -> st.SearchStrategy[Workload]:
    """`min_requests`..`max_requests` requests, each a prompt of 1..`max_prompt` token ids below `vocab` with
    `sampling_params(max_new, allow_sampling)`."""
    # One list of pairs, not a count and two lists: a failure then shrinks by deleting whole requests.
    request = st.tuples(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=max_prompt),
                        sampling_params(max_new, allow_sampling, vocab=vocab))
    return st.lists(request, min_size=min_requests, max_size=max_requests)


def combinations(host: PluginHost | None = None, *, include: Iterable[str] | Literal["all"] = (),
                 only: Mapping[str, Spec | Sequence[Spec]] | None = None) -> st.SearchStrategy[Combination]:
    """A `Combination`, each family drawn independently from `family_choices(host, include=, only=)`.

    ``combinations()`` draws built-ins only; ``combinations(host, include=["my_plugin"])`` adds the components
    `host` registered from that plugin; ``combinations(only={"scheduler": "my_scheduler"})`` pins the scheduler
    and draws the other three families. Failures shrink towards the first spec of each family (`single`, `one`,
    `eager`, `fifo`)."""
    choices = family_choices(host, include=include, only=only)
    return st.builds(Combination, *(st.sampled_from(choices[f]) for f in FIELDS))


#: One of `GEOMETRIES`, as keyword arguments of `engine_dict` / `Combination.config`.
geometries: st.SearchStrategy[dict[str, int]] = st.sampled_from(GEOMETRIES)
