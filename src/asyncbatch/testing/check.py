"""`check_engine`: run one workload on the `sim` runtime, in a chosen execution order, and assert the invariants.

The invariants (docs/invariants.md), checked in this order, each failing with an `InvariantError` that names it
and the engine's combination:

1. `no race`: the happens-before checker saw no unordered conflicting access.
2. `every request ends`: the run returns (no deadlock, no livelock, every KV block and row released, which
   `Engine.run` checks) and every request ends with `length` or `stop`.
3. `finish limits`: token counts and finish reasons obey `max_new_tokens`, stop ids and EOS.
4. `reference tokens`: greedy and seeded sampled requests get the tokens of the reference run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..core.runtime.sim import Chooser, RandomChooser, SimRuntime, SimRuntimeConfig
from ..core.types import SamplingParams
from .invariants import (
    EVERY_REQUEST_ENDS,
    FINISH_LIMITS,
    NO_RACE,
    REFERENCE_TOKENS,
    InvariantError,
    describe,
    is_race_error,
    limit_violations,
    listing,
    race_text,
    token_mismatches,
    unended,
)

if TYPE_CHECKING:
    from ..core.engine import Engine, RunResult
    from ..core.pipeline import PipelineDebug
    from ..core.plugin_host import PluginHost

Workload = Sequence[tuple[Sequence[int], SamplingParams]]

#: What the reference run changes in the engine mapping under test: the synchronous loop, `fifo`, program order,
#: the default attention. Model, geometry and seed stay.
REFERENCE: dict[str, Any] = {"runtime": "cpu", "buffers": "single", "streams": "one", "graphs": "eager",
                             "scheduler": "fifo", "attention": "auto"}


@attrs.frozen
class CheckResult:
    """A passing check: the engine that ran (its scheduler, runtime and config can be inspected), the run's result,
    and the reference tokens it was compared with."""

    engine: Engine
    result: RunResult
    expected: tuple[tuple[int, ...] | None, ...]


class _WatchedSim(SimRuntime):
    """The `sim` runtime, giving up after `max_batches` batches of one run: a scheduler that never lets the run end
    (it keeps preempting, or schedules work that makes no progress) then fails the check instead of hanging it."""

    def __init__(self, config: SimRuntimeConfig, *, chooser: Chooser, max_batches: int) -> None:
        super().__init__(config, chooser=chooser)
        self.max_batches = max_batches
        self.batches = 0

    def reset_timeline(self) -> None:
        super().reset_timeline()
        self.batches = 0

    def host_phase(self, name: str, **kwargs: Any) -> Any:
        # Every turn of the engine's loop opens one `prep` phase, batch or not: counting them bounds the loop.
        if name == "prep":
            self.batches += 1
            if self.batches > self.max_batches:
                raise RuntimeError(f"the run did not end within {self.max_batches} batches (a livelock?)")
        return super().host_phase(name, **kwargs)


def default_max_batches(workload: Workload) -> int:
    """Loop turns a run of `workload` may take before `check_engine` calls it a livelock: generous (a turn feeds
    at least one token unless it preempts, and recomputing after preemption is bounded in practice)."""
    return 100 + 20 * sum(len(p) + s.max_new_tokens for p, s in workload)


def reference_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The engine mapping of the reference run for `config`: `config` with `REFERENCE` applied."""
    return {**config, **REFERENCE}


def _split(workload: Workload) -> tuple[list[list[int]], list[SamplingParams], list[str]]:
    return [list(p) for p, _ in workload], [s for _, s in workload], [str(i) for i in range(len(workload))]


def reference_tokens(model: Any, config: Mapping[str, Any], workload: Workload, *,
                     host: PluginHost | None = None) -> tuple[tuple[int, ...], ...]:
    """Every request's tokens in the reference run of `config` (`reference_config`) on `model`.

    Raises ValueError when the reference fails a request: the workload is invalid for this engine (a prompt that
    leaves no room, a token outside the vocabulary), which is a mistake in the test, not in the engine."""
    from ..core.config import EngineConfig
    from ..core.engine import Engine

    prompts, params, ids = _split(workload)
    engine = Engine.from_model(model, EngineConfig.from_dict(reference_config(config), host=host), host=host)
    outputs = engine.generate(prompts, params, request_ids=ids)
    failed = [f"request {o.request_id!r}: {o.error}" for o in outputs if o.finish_reason == "error"]
    if failed:
        raise ValueError("the workload is invalid for this engine (the reference run failed it):\n  "
                         + listing(failed))
    return tuple(tuple(o.token_ids) for o in outputs)


def _chooser(data: Any, seed: int) -> Chooser:
    if data is None:
        return RandomChooser(seed)
    if hasattr(data, "choose"):
        return data
    if hasattr(data, "draw"):
        from .chooser import DataChooser

        return DataChooser(data)
    raise TypeError(f"data must be hypothesis's st.data() value, a Chooser or None; got {type(data).__name__}")


def check_engine(model: Any, config: Mapping[str, Any], workload: Workload, *, data: Any = None,
                 host: PluginHost | None = None, reference: Sequence[Sequence[int]] | None = None, seed: int = 0,
                 max_batches: int | None = None, debug: PipelineDebug | None = None) -> CheckResult:
    """Run `workload` on `model` with the engine mapping `config` on the `sim` runtime (random order, happens-before
    checking on; `config`'s own runtime is ignored) and assert the invariants of this module's docstring.

    `data`: who picks each execution decision: hypothesis's ``st.data()`` value (a `DataChooser`), any `Chooser`,
    or None for a random order seeded by `seed`. `host`: where component names are looked up (default: the
    process-wide host, built-ins and installed plugins). `reference`: the expected tokens, one sequence per request
    (None: not compared); default: `reference_tokens`, computed now. `max_batches`: loop turns before the run counts as a livelock
    (default: `default_max_batches`). `debug`: pipeline switches for testing the checker itself (remove an edge).

    Raises `InvariantError` (an AssertionError) naming the invariant and the combination; returns a `CheckResult`.
    Configuration mistakes raise as they would from `Engine`.
    """
    from ..core.config import EngineConfig
    from ..core.engine import Engine
    from ..core.pipeline import PipelineDebug

    config = dict(config)
    label = describe(config)
    prompts, params, ids = _split(workload)
    expected = (tuple(None if t is None else tuple(t) for t in reference) if reference is not None
                else reference_tokens(model, config, workload, host=host))
    if len(expected) != len(workload):
        raise ValueError(f"reference has {len(expected)} entries for {len(workload)} requests")
    runtime = _WatchedSim(SimRuntimeConfig(seed=seed), chooser=_chooser(data, seed),
                          max_batches=max_batches or default_max_batches(workload))
    engine = Engine.from_model(model, EngineConfig.from_dict(config, host=host), host=host, runtime=runtime,
                               debug=debug or PipelineDebug())
    try:
        result = engine.run(engine.make_requests(prompts, params, request_ids=ids))
    except Exception as exc:
        if type(exc).__module__.split(".")[0] == "hypothesis":  # hypothesis's own control flow, not a failure
            raise
        raised = f"the run raised {type(exc).__name__}: {exc}"
        if runtime.conflicts:  # a race explains what followed (garbage inputs can fail a step)
            then = "" if is_race_error(exc) else f"\n  then {raised}"
            raise InvariantError(NO_RACE, label, race_text(runtime) + then) from exc
        raise InvariantError(EVERY_REQUEST_ENDS, label, raised) from exc
    if runtime.conflicts:
        raise InvariantError(NO_RACE, label, race_text(runtime))
    outputs = result.outputs
    for invariant, found in (
        (EVERY_REQUEST_ENDS, unended(outputs)),
        (FINISH_LIMITS, limit_violations(outputs, params, eos_ids=engine.eos_ids, max_len=engine.max_len)),
        (REFERENCE_TOKENS, token_mismatches(outputs, params, expected)),
    ):
        if found:
            raise InvariantError(invariant, label, listing(found))
    return CheckResult(engine, result, expected)
