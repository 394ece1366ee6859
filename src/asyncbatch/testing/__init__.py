"""The researcher's test kit: check any engine combination, or one component, against the design's invariants.

- Strategies (hypothesis): `sampling_params`, `workloads`, `combinations`, `geometries`; `engine_dict` and
  `Combination` build engine mappings; `every_combination` and `component_specs` list what the plugin host has.
- Execution order: `DataChooser` (hypothesis picks every decision of the `sim` runtime), `RandomChooser`, and the
  runtime's `Chooser` protocol.
- Checks: `check_engine` (one run, four invariants, `InvariantError` on failure), `check_component` (one
  component with every built-in of the other families), `invariant_test` (a ready-made hypothesis test),
  `reference_tokens`, `Checker`.
- Ranks: `run_ranks` runs one engine per tensor-parallel rank on the `sim` runtime, their compute ops meeting
  in a `SimGroup` as the all-reduces make them meet on cards; ranks that split raise `RanksSplitError`.
- The pytest plugin (`asyncbatch.testing.pytest_plugin`, loaded automatically): fixtures `asyncbatch_host`,
  `asyncbatch_model_factory`, `asyncbatch_tiny_model`, `asyncbatch_check`.

Importing this package is light: names load on first use, and only the strategies and `DataChooser` need
hypothesis (the `test` extra).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BUFFERS": "combos", "STREAMS": "combos", "GRAPHS": "combos", "SCHEDULERS": "combos", "GEOMETRIES": "combos",
    "FIELDS": "combos", "Combination": "combos", "Spec": "combos", "engine_dict": "combos",
    "component_specs": "combos", "family_choices": "combos", "every_combination": "combos",
    "VOCAB": "strategies", "sampling_params": "strategies", "workloads": "strategies",
    "combinations": "strategies", "geometries": "strategies",
    "Chooser": "chooser", "RandomChooser": "chooser", "DataChooser": "chooser",
    "INVARIANTS": "invariants", "InvariantError": "invariants",
    "check_engine": "check", "reference_tokens": "check", "CheckResult": "check", "REFERENCE": "check",
    "check_component": "component", "invariant_test": "component", "fixed_workload": "component",
    "FIXED_GEOMETRY": "component", "Checker": "component",
    "tiny_model": "models",
    "run_ranks": "ranks", "SimGroup": "ranks", "RanksSplitError": "ranks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncbatch.testing' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
