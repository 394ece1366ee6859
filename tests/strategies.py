"""The suite's strategies and chooser: the public test kit's (`asyncbatch.testing`), re-exported so that test
modules keep importing them from here."""

from __future__ import annotations

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
           "combinations", "engine_dict", "geometries", "sampling_params", "workloads"]
