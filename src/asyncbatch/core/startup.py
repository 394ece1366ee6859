"""Start-up: everything an engine compiles and captures before a run's clock starts.

A captured step is keyed by its padded `StepShape`; the pipeline can list every shape a run can produce
(`Pipeline.step_shapes`). Warming up runs each shape the graph policy captures once per slot on padding-only inputs
(padding writes only the trash block and row), so the run that follows replays and never captures. Compiled layers
are compiled by the same runs. Inductor's artifacts go to a directory kept across processes, so the next process
skips most of the compile.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .layout import StepShape

log = logging.getLogger("asyncbatch")

MODES = ("greedy", "sample", "filter")


def use_compile_cache(directory: str | None) -> Path | None:
    """Point inductor's on-disk cache at `directory`, unless the user chose one with TORCHINDUCTOR_CACHE_DIR.

    Must run before the first compile. Inductor writes its default into the environment the first time it looks
    for a cache directory, so a value equal to torch's default counts as not chosen.
    """
    if directory is None:
        return None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(current) != os.path.abspath(default_cache_dir()):
            return Path(current)
    path = Path(directory).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compile cache %s is not writable (%s): torch's default cache is used", path, exc)
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    # The attention backend's own Triton kernels: beside inductor's, unless the user placed them elsewhere.
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    return path


def request_modes(params: Iterable[Any]) -> set[str]:
    """The sampling paths a run of requests with these `SamplingParams` can take (a batch takes the most general
    path among its requests, which is always one of theirs)."""
    return {p.sample_mode for p in params}


class Warmup:
    """What one engine has warmed up, and warming the rest. Called with the engine's model bound and its lock held."""

    def __init__(self, pipeline: Any, graphs: Any, *, compiled: bool, progress: bool) -> None:
        self.pipeline = pipeline
        self.graphs = graphs
        self.compiled = compiled
        self.progress = progress
        self.done: set[StepShape] = set()

    def plan(self, modes: Iterable[str]) -> tuple[list[StepShape], bool]:
        """Shapes still to warm up for `modes`, and whether the run's shapes are all known ahead.

        Captured shapes come from the graph policy. Without any (eager steps), compiled layers still need one small
        and one large step to compile both of their specialisations (one token, many tokens).
        """
        shapes, complete = self.pipeline.step_shapes(sorted(set(modes), key=MODES.index))
        captured = [s for s in shapes if self.graphs.uses_graph(s)]
        if self.compiled and not captured:
            captured = [s for s in shapes if s.tokens == 1][:1] + [s for s in shapes if not s.is_decode][-1:]
        return [s for s in captured if s not in self.done], complete

    def run(self, shapes: list[StepShape], modes: Iterable[str], complete: bool = True) -> float:
        """Run each shape in every slot (capturing it where the graph policy captures). Returns seconds spent."""
        if not shapes:
            return 0.0
        start = time.perf_counter()
        bar = None
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(shapes) * self.pipeline.num_slots, unit="shape", desc="warm-up", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        try:
            self.pipeline.warmup(shapes, on_shape=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        self.done.update(shapes)
        log.info("warm-up: %d step shapes x %d slots (%s) in %.1f s, %d graphs%s", len(shapes),
                 self.pipeline.num_slots, ", ".join(sorted(set(modes))), seconds, self.graphs.num_graphs(),
                 "" if complete else "; steps holding prefill chunks are not warmed up (the attention backend "
                 "bakes their lengths into its launch, so their shapes are not known ahead)")
        return seconds

    def ahead(self, modes: Iterable[str], buckets: set[int] | None = None) -> int:
        """`Engine.warmup`: every shape of `modes`, or with `buckets` (padded token counts) only the decode shapes
        of those. Returns how many (shape, slot) pairs ran."""
        shapes, complete = self.plan(modes)
        if buckets:
            shapes, complete = [s for s in shapes if s.is_decode and s.tokens in buckets], False
        self.run(shapes, modes, complete)
        return len(shapes) * self.pipeline.num_slots

    def modes(self, modes: Iterable[str]) -> float:
        """Warm up whatever `modes` still need; returns the seconds spent."""
        modes = set(modes)
        shapes, complete = self.plan(modes)
        return self.run(shapes, modes, complete)
