"""One component against the invariants: every combination with the built-ins of the other families on a fixed
workload (`check_component`), or hypothesis-drawn ones (`invariant_test`); `Checker` binds them to a model."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..core.types import SamplingParams
from .check import CheckResult, Workload, check_engine, reference_tokens
from .combos import Spec, every_combination, field_of, spec_text

if TYPE_CHECKING:
    from ..core.plugin_host import PluginHost

#: The geometry of `check_component`'s default run: 6 rows, 16 tokens a batch, a cache small enough to preempt.
FIXED_GEOMETRY: dict[str, int] = {"max_tokens": 16, "max_seqs": 6, "num_blocks": 24, "block_size": 4}


def fixed_workload(seed: int = 3, num_requests: int = 10) -> list[tuple[list[int], SamplingParams]]:
    """A deterministic workload with everything a scheduler must cope with: prompts of 1..30 tokens (split under
    `FIXED_GEOMETRY`), 1..10 new tokens, greedy and seeded sampled requests, top-k, stop ids, three priorities."""
    rng = random.Random(seed)
    work = []
    for i in range(num_requests):
        prompt = [rng.randrange(512) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 10), temperature=[0.0, 0.9][i % 2],
                                top_k=[0, 8][i % 3 == 0], stop_token_ids=(rng.randrange(512), 17), seed=i,
                                priority=i % 3)
        work.append((prompt, params))
    return work


def check_component(model: Any, family: str, spec: Spec, *, host: PluginHost | None = None,
                    workload: Workload | None = None, geometry: Mapping[str, int] | None = None,
                    seeds: Sequence[int] = (0,)) -> list[CheckResult]:
    """`check_engine` for the component `spec` of `family` (``scheduler``, ``buffers``, ``streams``, ``graphs``,
    or their registry names) combined with every built-in of the three other families, on `workload` (default:
    `fixed_workload()`) with `geometry` (default: `FIXED_GEOMETRY`), once per execution-order seed.

    The reference is computed once and shared: it does not depend on the combination. Raises the first
    `InvariantError`; returns one `CheckResult` per run."""
    work = fixed_workload() if workload is None else workload
    geo = dict(FIXED_GEOMETRY if geometry is None else geometry)
    combos = every_combination(only={field_of(family): [spec]})
    expected = reference_tokens(model, combos[0].config(**geo), work, host=host)
    return [check_engine(model, combo.config(**geo), work, host=host, reference=expected, seed=seed)
            for combo in combos for seed in seeds]


def invariant_test(family: str, *specs: Spec, host: PluginHost | None = None, max_examples: int = 20,
                   workloads: Any = None, geometries: Any = None) -> Callable[..., None]:
    """A hypothesis test of `specs` (one or more specs of one component family) against the invariants; assign it
    to a module-level ``test_*`` name and pytest collects it::

        test_my_scheduler = invariant_test("scheduler", "my_scheduler", {"name": "my_scheduler", "k": 2})

    Each example draws one of `specs`, the built-ins of the other families, a workload (`workloads`, a strategy;
    default `strategies.workloads()`), a geometry (`geometries`; default `strategies.geometries`) and the
    execution order. The test uses the pytest plugin's fixture `asyncbatch_check`: the tiny float64 model, and
    unless `host` is given, `asyncbatch_host` (built-ins and installed plugins)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from . import strategies

    if not specs:
        raise ValueError("invariant_test needs at least one spec of the component under test")
    field = field_of(family)

    def test(asyncbatch_check: Checker, work: Any, combo: Any, geometry: Any, data: Any) -> None:
        checker = asyncbatch_check if host is None else attrs.evolve(asyncbatch_check, host=host)
        checker(combo.config(**geometry), work, data=data)

    # Named before hypothesis wraps it: its failure report and its database key come from the function it gets.
    label = re.sub(r"\W+", "_", " ".join(spec_text(s) for s in specs)).strip("_")
    test.__name__ = test.__qualname__ = f"test_{field}_{label}_invariants"
    test.__doc__ = (f"{field} {', '.join(spec_text(s) for s in specs)} with the built-ins of the other families: "
                    "no race, every request ends, finish limits, reference tokens.")
    given_ = given(work=strategies.workloads() if workloads is None else workloads,
                   combo=strategies.combinations(only={field: list(specs)}),
                   geometry=strategies.geometries if geometries is None else geometries, data=st.data())
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given_(test))


@attrs.frozen(repr=False)
class Checker:
    """`check_engine`, `check_component` and `reference_tokens` bound to one model and plugin host (the
    `asyncbatch_check` fixture)."""

    model: Any
    host: PluginHost | None = None

    def __repr__(self) -> str:  # short: hypothesis prints it with every failing example
        host = "None" if self.host is None else f"PluginHost(plugins={len(self.host.plugin_names())})"
        return f"Checker(model={type(self.model).__name__}, host={host})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's printer would list the fields
        printer.text(repr(self))

    def __call__(self, config: Mapping[str, Any], workload: Workload, **kwargs: Any) -> CheckResult:
        """`check_engine(model, config, workload, host=host, **kwargs)`."""
        return check_engine(self.model, config, workload, host=self.host, **kwargs)

    def component(self, family: str, spec: Spec, **kwargs: Any) -> list[CheckResult]:
        """`check_component(model, family, spec, host=host, **kwargs)`."""
        return check_component(self.model, family, spec, host=self.host, **kwargs)

    def reference(self, config: Mapping[str, Any], workload: Workload) -> tuple[tuple[int, ...], ...]:
        """`reference_tokens(model, config, workload, host=host)`."""
        return reference_tokens(self.model, config, workload, host=self.host)
