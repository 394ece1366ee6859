"""Replicates: the runs of one cell under `repeat: N`, and the seeds each repetition runs with.

Repetition i (from 0) adds i to the experiment's `seed`, to `workload.seed` where the workload sets its own, and to
`engine.seed`; repetition 0 is the cell as configured. A swept seed is a replicate too (`plugins.sweeps`), so two
swept values closer than `repeat` would make one cell's repetition another cell's run: such a sweep is refused.
"""

from __future__ import annotations

from typing import Any

import attrs

from .dotted import _frozen
from .errors import ConfigError
from .types import show

#: The dotted keys that seed a run: cells that differ only in these are replicates of one another.
SEED_KEYS = ("seed", "engine.seed", "workload.seed")


def replica(experiment: Any, index: int) -> Any:
    """Repetition `index` of `experiment` (an `ExperimentConfig`) as a single run (`repeat: 1`). The model is the
    same in every repetition: `engine.model.seed` is not changed."""
    workload = experiment.workload
    own = getattr(workload.config, "seed", None)
    if isinstance(own, int) and not isinstance(own, bool) and attrs.has(type(workload.config)):
        workload = attrs.evolve(workload, config=attrs.evolve(workload.config, seed=own + index))
    return attrs.evolve(experiment, repeat=1, seed=experiment.seed + index, workload=workload,
                        engine=attrs.evolve(experiment.engine, seed=experiment.engine.seed + index))


def refuse_shared_seeds(assignments: list[dict[str, Any]], repeat: int) -> None:
    """Refuse a sweep whose cells would share seeds through `repeat`: for each swept seed key, among cells that
    agree on every other non-seed key, cell value v runs v, v+1, ..., v+repeat-1, and no two cells may meet."""
    if repeat < 2:
        return
    for key in SEED_KEYS:
        runs: dict[Any, tuple[int, int]] = {}  # (other keys, seed run) -> (the cell's value, repetition)
        for cell in assignments:
            v = cell.get(key)
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            rest = _frozen({k: x for k, x in cell.items() if k not in SEED_KEYS})
            for r in range(repeat):
                w, q = runs.setdefault((rest, v + r), (v, r))
                if w != v:
                    a, b = sorted(((v, r), (w, q)), key=lambda p: p[1])
                    raise ConfigError(f"sweep.{key}", (
                        f"with repeat: {repeat}, the cell with {key} {show(b[0])} runs {key} {show(b[0] + b[1])} "
                        f"as its repetition {b[1]}, which the cell with {key} {show(a[0])} runs as its repetition "
                        f"{a[1]}: replicates would share seeds (repetition i adds i to the seeds); space the swept "
                        f"values at least {repeat} apart, or sweep fewer and raise repeat"))
