"""Tensor-parallel ranks on the `sim` runtime, for tests and studies: `run_ranks`, `SimGroup`, `RanksSplitError`
(the implementation lives with the runtime, in `asyncbatch.core.runtime.sim_group`)."""

from __future__ import annotations

from ..core.runtime.sim_group import RanksSplitError, SimGroup, run_ranks

__all__ = ["RanksSplitError", "SimGroup", "run_ranks"]
