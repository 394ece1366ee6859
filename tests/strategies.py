"""The suite's strategies and chooser: the public test kit's (`asyncbatch.testing`), re-exported so that test
modules keep importing them from here."""

from __future__ import annotations

from hypothesis import strategies as st

from asyncbatch.testing.chooser import DataChooser
from asyncbatch.testing.combos import (
    BUFFERS,
    GEOMETRIES,
    GRAPHS,
    SCHEDULERS,
    STREAMS,
    Combination,
    engine_dict,
)
from asyncbatch.testing.strategies import VOCAB, combinations, geometries, sampling_params, workloads

__all__ = ["BUFFERS", "GEOMETRIES", "GRAPHS", "SCHEDULERS", "STREAMS", "VOCAB", "Combination", "DataChooser",
           "combinations", "engine_dict", "geometries", "sampling_params", "workload_seeds", "workloads"]


def workload_seeds(min_value: int | None = None) -> st.SearchStrategy[int]:
    """Seeds as a config gives them: any int (negative ones too), around 0 and far from it."""
    lo = -(2**70) if min_value is None else min_value
    return st.one_of(st.integers(min_value=max(lo, -8), max_value=8), st.integers(min_value=lo, max_value=2**70))
