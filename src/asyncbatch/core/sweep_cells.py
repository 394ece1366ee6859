"""The cells of an experiment's sweep: one validated experiment per combination of the swept values.

Works on the experiment's plain (YAML-shaped) form, with `dotted` reading the axes and setting each cell's keys;
the caller's `build` structures and validates a cell (`ExperimentConfig.sweep_cells` passes its own `from_dict`,
so this module needs nothing from `config`). An error in a cell names it (`cell_key`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

from .dotted import check_path, refuse_repeated_cells, set_path, sweep_axes
from .errors import ConfigError
from .replicates import refuse_shared_seeds
from .structure import unstructure
from .types import show

Cell = TypeVar("Cell")


def cell_key(assignment: dict[str, Any]) -> str:
    """How an error names the sweep cell it comes from: `sweep cell {'engine.seed': 3}`."""
    return "sweep cell {" + ", ".join(f"{k!r}: {show(v)}" for k, v in assignment.items()) + "}"


def expand_sweep(base: dict[str, Any], sweep: dict[str, Any], build: Callable[[dict[str, Any]], Cell],
                 host: Any = None, repeat: int = 1) -> list[tuple[dict[str, Any], Cell]]:
    """One (assignment, cell) per cell of `sweep` over `base` (the experiment's plain form, without `sweep`).

    The cells are the product of the axes: every plain key is one axis, and the `zip` group is one axis whose
    i-th point sets each of its keys to that key's i-th value. Every key must name a field of `base`; two cells
    that resolve alike are refused, and so are swept seeds that `repeat` would make meet
    (`replicates.refuse_shared_seeds`). No axes -> no cells (the caller's experiment is its own single cell)."""
    axes = sweep_axes(sweep)
    for keys, points in axes:
        for k in keys:
            if k.startswith("engine.parallel"):
                raise ConfigError(f"sweep.{k}", "the processes of a run are started once for the whole "
                                                "experiment: set engine.parallel outside the sweep")
            try:
                check_path(base, k, host)
            except ConfigError as missing:
                raise _why_missing(base, k, [dict(zip(keys, point)) for point in points], build) or missing \
                    from None
    cells: list[tuple[dict[str, Any], Cell]] = []
    combos = list(itertools.product(*(range(len(points)) for _, points in axes))) if axes else []
    for combo in combos:
        assignment = {k: v for (keys, points), i in zip(axes, combo) for k, v in zip(keys, points[i])}
        data = copy.deepcopy(base)
        for k, v in assignment.items():
            set_path(data, k, v)
        try:
            cells.append((assignment, build(data)))
        except ConfigError as exc:
            raise ConfigError(cell_key(assignment), str(exc)) from exc
    refuse_repeated_cells(axes, combos, [unstructure(cell) for _, cell in cells])
    refuse_shared_seeds([assignment for assignment, _ in cells], repeat)
    return cells


def _why_missing(base: dict[str, Any], key: str, points: list[dict[str, Any]],
                 build: Callable[[dict[str, Any]], Cell]) -> ConfigError | None:
    """Why the plain form has no `key` where its section exists: the resolved form leaves out what a config
    ignores (a length distribution's `value` beside `dist: uniform`). Building a cell with the key set says why
    where it refuses the value; else the section's resolved form is shown. None: the section itself is missing."""
    *parents, last = key.split(".")
    node: Any = base
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not parents:
        return None
    for point in points:
        data = copy.deepcopy(base)
        for k, v in point.items():
            set_path(data, k, v)
        try:
            build(data)
        except ConfigError as exc:
            if exc.key == key and exc.message.startswith("unknown key"):
                return None  # a misspelt key: "no such key" lists what the section holds
            if exc.key == key:
                return ConfigError(f"sweep.{key}", exc.message, exc.valid)
            return ConfigError(f"sweep.{key}", str(exc))
    return ConfigError(f"sweep.{key}", f"{'.'.join(parents)} resolves to {show(node)}, which does not read "
                                       f"{last}: every cell would run alike, whatever it is set to")
