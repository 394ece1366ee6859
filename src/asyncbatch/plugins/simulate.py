"""The simulation study: how busy the GPU would be for given per-step costs, for every pipeline combination.

Each combination of buffers x streams x graphs runs the real engine loop, built through the plugin host (so
plugin components take part), on the `sim` runtime in `timed` order (a discrete-event simulation: every op
starts as soon as its dependencies and its stream allow; streams run in issue order, as CUDA's do), with the
happens-before checker off, on the tiny model. Real tokens flow, but only the virtual clock of the cost model
counts, so the answer depends on the costs and the pipeline, never on this machine. What runs is a
`StudyConfig` (see `simulate_config`).

Launch cost is separate from `cpu_ms`: `launch_eager_ms` for an eagerly launched step, `launch_graph_ms` for a
graph replay, so graphs pay off exactly where launches are what keeps the GPU waiting.

Three busy fractions, because fill and drain bias short runs: `run` is compute time over the whole run (the
first step's prep and launch come before any GPU work, the last step's d2h and update after it); `steady` is
the same over the middle half of the steps, where the pipeline is full; `busy` is the runtime's own figure (from
the first compute's start to the last one's end), the one `asyncbatch run` reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..core.errors import ConfigError
from .simulate_config import PREP_SHARE, Choice, StudyConfig, StudyCosts, load_study

__all__ = ["StudyConfig", "StudyCosts", "StudyRow", "expected_busy", "expected_run_busy", "load_study", "run_study",
           "study_json", "study_table"]

ROLES = ("h2d", "compute", "d2h")
_THREE = {role: role for role in ROLES}
MANY = math.inf  # slots enough that the slot cycle never binds: the limit more slots approach


@attrs.frozen
class StudyRow:
    buffers: str
    streams: str
    graphs: str
    slots: int
    busy_run: float
    busy_steady: float | None
    expected_run: float
    expected_busy: float
    busy: float | None
    tokens_per_s: float
    ms_per_step: float
    steps: int
    launch_ms: float


# ---------------------------------------------------------------- the analytic model


def launch_ms(c: StudyCosts, graph: bool) -> float:
    return c.launch_graph_ms if graph else c.launch_eager_ms


def latency_ms(c: StudyCosts, graph: bool) -> float:
    """One step from the start of its prep to the end of its update. The h2d copy is issued before the launch,
    so it hides under it: only the longer of the two is on the path."""
    return c.cpu_ms + max(launch_ms(c, graph), c.h2d_ms) + c.gpu_ms + c.d2h_ms


def device_ms(c: StudyCosts, stream_of: Mapping[str, str]) -> float:
    """Device time per step. Streams run their ops in issue order, as CUDA's do, and each step issues h2d,
    compute, d2h: a copy sharing the compute stream sits between two computes, and so does an h2d that queues
    behind the previous step's d2h (which waits for that step's compute)."""
    h2d, comp, d2h = (stream_of[role] for role in ROLES)
    between = [0.0]
    if h2d == comp:
        between.append(c.h2d_ms)
    if d2h == comp:
        between.append(c.d2h_ms + (c.h2d_ms if h2d == comp else 0.0))
    if d2h == h2d:
        between.append(c.d2h_ms + c.h2d_ms)
    load: dict[str, float] = {}
    for stream, ms in zip((h2d, comp, d2h), (c.h2d_ms, c.gpu_ms, c.d2h_ms), strict=True):
        load[stream] = load.get(stream, 0.0) + ms
    return max(c.gpu_ms + max(between), *load.values())


def period_ms(c: StudyCosts, slots: float, graph: bool, stream_of: Mapping[str, str]) -> float:
    """Steady-state time per step: the slowest of three cycles. The host's own loop (cpu + launch); the
    device's (`device_ms`); and the slot cycle: the host updates batch k only after its d2h and prepares batch
    k + slots right after, so `slots` steps must cover one step's latency."""
    return max(c.cpu_ms + launch_ms(c, graph), device_ms(c, stream_of), latency_ms(c, graph) / slots)


def expected_busy(c: StudyCosts, slots: float, graph: bool, stream_of: Mapping[str, str]) -> float:
    return c.gpu_ms / period_ms(c, slots, graph, stream_of)


def expected_run_busy(c: StudyCosts, steps: int, slots: int, graph: bool, stream_of: Mapping[str, str]) -> float:
    """Over the whole run, the later of two ends. Device-bound: the first step takes a full latency (its prep and
    launch before any GPU work, its d2h and update after), each later one a device or slot cycle. Host-bound:
    the host never waits until its last launch (its first slots - 1 steps have no update yet); then it updates
    the other slots in flight, each after an empty prep (the sim charges every prep phase), and last the final
    step, once that step's compute and d2h are done. Exact when one side clearly binds; near the balance point
    the host waits now and then, and the run is up to ~1% slower than this."""
    prep, upd, launch = c.cpu_ms * PREP_SHARE, c.cpu_ms * (1 - PREP_SHARE), launch_ms(c, graph)
    latency = latency_ms(c, graph)
    device = (steps - 1) * max(device_ms(c, stream_of), latency / slots) + latency
    last_launch = steps * (prep + launch) + (steps - slots) * upd
    last_done = c.gpu_ms + c.d2h_ms + max(0.0, c.h2d_ms - launch)
    host = last_launch + max((slots - 1) * c.cpu_ms, last_done) + upd
    return steps * c.gpu_ms / max(device, host)


# ---------------------------------------------------------------- running the study


def _engine_config(study: StudyConfig, buffers: Choice, streams: Choice, graphs: Choice, host: Any) -> Any:
    from ..core.config import EngineConfig

    w = study.workload
    blocks_per_request = -(-(w.prompt_len + study.steps) // 16)
    return EngineConfig.from_dict({
        "model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        # fifo_streams: CUDA streams run ops in issue order. Without it an h2d could overtake the previous step's
        # d2h on a shared copy stream, and `two` would look as good as `three`.
        "runtime": {"name": "sim", "order": "timed", "check": False, "fifo_streams": True,
                    "cost": study.costs.cost_model()},
        "scheduler": study.scheduler, "buffers": buffers.spec, "streams": streams.spec, "graphs": graphs.spec,
        "attention": "sdpa",
        "cache": {"block_size": 16, "num_blocks": w.requests * blocks_per_request + 2},
        # Every request fits the first batch: one prefill step, then decode steps only.
        "batch": {"max_tokens": w.requests * w.prompt_len, "max_seqs": w.requests},
    }, key="engine", host=host)


def _steady_busy(comp: Sequence[Any], slots: int) -> float | None:
    """Compute time over the middle half of the steps, from the start of one step to the start of another, and
    never within `slots` steps of either end: the host runs its first slots - 1 steps without updates, and the
    last ones drain. None when the run is too short to have such a middle."""
    n = len(comp)
    i, j = max(n // 4, slots), min(n - 1 - n // 4, n - 1 - slots)
    if j <= i:
        return None
    return sum(s.end - s.start for s in comp[i:j]) / (comp[j].start - comp[i].start)


def _measure(study: StudyConfig, combo: tuple[Choice, Choice, Choice], engine: Any, result: Any) -> StudyRow:
    s = result.summary
    if s.steps != study.steps:
        # A scheduler that splits the batch, or preemption: the analytic model assumes one step per token.
        raise ConfigError("simulate.scheduler", f"{study.scheduler.name!r} ran {s.steps} steps for a horizon of "
                                                f"{study.steps}: the study needs every request in every step")
    comp = sorted((x for x in engine.runtime.spans if x.name == "comp"), key=lambda x: x.start)
    slots = engine.pipeline.buffers.num_slots
    stream_of = {role: engine.pipeline.topology.stream_for(role) for role in ROLES}
    graph = result.steps[len(result.steps) // 2].graph_replay  # the launch mode of the steady-state steps
    c = study.costs
    return StudyRow(
        *(x.label for x in combo), slots=slots, busy_run=sum(x.end - x.start for x in comp) / s.wall_s,
        busy_steady=_steady_busy(comp, slots), expected_run=expected_run_busy(c, s.steps, slots, graph, stream_of),
        expected_busy=expected_busy(c, slots, graph, stream_of), busy=s.compute_busy_fraction,
        tokens_per_s=s.tokens_per_s, ms_per_step=s.wall_s * 1e3 / max(1, s.steps), steps=s.steps,
        launch_ms=launch_ms(c, graph))


def run_study(study: StudyConfig | None = None, *, host: Any = None) -> list[StudyRow]:
    """Run every combination of the study's axes; each serves the workload for `steps` steps."""
    import torch

    from ..core import models
    from ..core.config import ModelConfig
    from ..core.engine import Engine
    from ..core.plugin_host import get_plugin_host
    from ..core.types import Request, SamplingParams

    host = host or get_plugin_host()
    study = study or load_study(host=host)
    log = logging.getLogger("asyncbatch")
    level, threads = log.level, torch.get_num_threads()
    # Virtual time makes real speed irrelevant; one thread avoids oversubscribing a small, shared CPU.
    torch.set_num_threads(1)
    log.setLevel(max(level, logging.WARNING))
    try:
        model, _ = models.build_model(ModelConfig(preset="tiny", dtype="float32", device="cpu"), host)
        # ignore_eos: a random model may emit its EOS token, which would end a request before the horizon.
        params = SamplingParams(max_new_tokens=study.steps, ignore_eos=True)
        w = study.workload
        requests = [Request(f"sim-{i}", tuple(1 + (i + j) % 500 for j in range(w.prompt_len)), params)
                    for i in range(w.requests)]
        rows = []
        for buffers in study.buffers:
            for streams in study.streams:
                for graphs in study.graphs:
                    combo = (buffers, streams, graphs)
                    engine = Engine.from_model(model, _engine_config(study, *combo, host), host=host)
                    rows.append(_measure(study, combo, engine, engine.run(requests)))
        return rows
    finally:
        torch.set_num_threads(threads)
        log.setLevel(level)


def study_table(study: StudyConfig, rows: Sequence[StudyRow]) -> str:
    from .experiment import fmt, format_table

    c, w, n = study.costs, study.workload, study.steps
    table = format_table(
        ("buffers", "streams", "graphs", "run busy", "expected", "steady busy", "expected", "virtual tok/s",
         "virtual ms/step"),
        [(r.buffers, r.streams, r.graphs, fmt(r.busy_run, 3), fmt(r.expected_run, 3), fmt(r.busy_steady, 3),
          fmt(r.expected_busy, 3), fmt(r.tokens_per_s, 1), fmt(r.ms_per_step, 2)) for r in rows])
    host = c.cpu_ms + c.launch_eager_ms
    fill_ms = latency_ms(c, False) - period_ms(c, 2, False, _THREE)
    run, steady = expected_run_busy(c, n, 2, False, _THREE), expected_busy(c, 2, False, _THREE)
    lines = [
        f"per-step costs: gpu {c.gpu_ms:g} ms; host cpu {c.cpu_ms:g} ms (prep {c.cpu_ms * PREP_SHARE:.3g} + update "
        f"{c.cpu_ms * (1 - PREP_SHARE):.3g}); launch eager {c.launch_eager_ms:g} / graph {c.launch_graph_ms:g} ms; "
        f"h2d {c.h2d_ms:g} ms, d2h {c.d2h_ms:g} ms",
        f"workload: {w.requests} request{'s' * (w.requests != 1)} x {n} tokens ({n} steps: 1 prefill + {n - 1} decode), prompts of "
        f"{w.prompt_len} tokens; scheduler {study.scheduler.name}",
        "",
        table,
        "",
        "run busy = virtual compute time / the whole run (sim runtime, timed order, streams in issue order as in "
        "CUDA). A run pays fill and drain once: the first step's prep + launch come before any GPU work, the last "
        "step's d2h + update after it.",
        "steady busy = the same over the middle half of the steps (n/a where the run is too short to have one).",
        f"expected = analytic; latency = cpu + max(launch, h2d) + gpu + d2h = {latency_ms(c, False):.2f} ms eager, "
        "one step from its prep to its update:",
        "  steady: gpu / period, period = max(cpu + launch, device per step, latency / slots); device per step = gpu "
        "plus the copies that queue between two computes (one, two streams: h2d + d2h)",
        f"    one slot: {expected_busy(c, 1, False, _THREE):.3f} eager, {expected_busy(c, 1, True, _THREE):.3f} with "
        f"graphs; many slots on three streams: {expected_busy(c, MANY, False, _THREE):.3f} eager, "
        f"{expected_busy(c, MANY, True, _THREE):.3f} with graphs",
        "  run: steps x gpu / the later end: the device's, (steps - 1) x period + latency, or the host's when it is "
        "the bottleneck (all its work, plus an empty prep and an update per other slot in flight at the end)",
        f"    fill + drain on double/three/eager: latency - period = {fill_ms:.2f} ms once, "
        f"{1 - run / steady:.2%} of this run's busy fraction",
    ]
    if c.cpu_ms + c.launch_graph_ms >= c.gpu_ms:
        lines.append(f"  host-bound: host work per step ({host:g} ms eager) exceeds GPU work ({c.gpu_ms:g} ms), so "
                     "overlap cannot keep the GPU busy; only less host work per step can (bigger batches, graphs, "
                     "a faster scheduler).")
    elif host >= c.gpu_ms:
        lines.append(f"  host-bound when eager: cpu + eager launch ({host:g} ms) exceeds gpu ({c.gpu_ms:g} ms); "
                     "graphs bring the launch cost under it.")
    return "\n".join(lines)


def study_json(study: StudyConfig, rows: Sequence[StudyRow]) -> dict[str, Any]:
    c = study.costs
    return {"study": study.to_dict(), "costs": attrs.asdict(c), "steps": study.steps,
            "requests": study.workload.requests, "cost_model": c.cost_model(),
            "analytic": {"sync_eager": expected_busy(c, 1, False, _THREE), "sync_graph": expected_busy(c, 1, True, _THREE),
                         "overlap_eager": expected_busy(c, MANY, False, _THREE),
                         "overlap_graph": expected_busy(c, MANY, True, _THREE)},
            "rows": [attrs.asdict(r) for r in rows]}
