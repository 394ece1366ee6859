"""The simulation study: how busy the GPU would be for given per-step costs, for every pipeline combination.

Each combination of buffers x streams x graphs runs the real engine loop on the `sim` runtime in `timed` order
(a discrete-event simulation: every op starts as soon as its dependencies and its stream allow), with the
happens-before checker off, on the tiny model. Real tokens flow, but only the virtual clock of the cost model
counts, so the answer depends on the costs and the pipeline, never on this machine.

Cost split: `cpu_ms` is the host work of one step other than launching (scheduling, input preparation, reading
outputs); 75% of it is charged to `prep` and 25% to `upd`, roughly the proportions measured on a CPU run. The
split does not change the busy fraction of either loop, since both phases sit on the host's path every step;
it only moves where the host waits. Launch cost is separate: `launch_eager_ms` for an eagerly launched step,
`launch_graph_ms` for a graph replay, so graphs pay off exactly where launches are what keeps the GPU waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs

from ..core.errors import ConfigError

PREP_SHARE = 0.75
NUM_REQUESTS = 8
PROMPT_LEN = 4
BUFFERS: tuple[tuple[str, Any, int], ...] = (
    ("single", "single", 1), ("double", "double", 2), ("n_slot(3)", {"name": "n_slot", "num_slots": 3}, 3))
STREAMS = ("one", "two", "three")
GRAPHS = ("eager", "per_slot")


def _non_negative(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ConfigError(f"--{attribute.name.replace('_', '-')}", f"must be >= 0, got {value}")


@attrs.frozen
class StudyCosts:
    """Per-step costs in milliseconds (defaults: the published shape, about 24% GPU idle when synchronous)."""

    gpu_ms: float = 28.0
    cpu_ms: float = attrs.field(default=8.3, validator=_non_negative)
    launch_eager_ms: float = attrs.field(default=0.5, validator=_non_negative)
    launch_graph_ms: float = attrs.field(default=0.05, validator=_non_negative)
    h2d_ms: float = attrs.field(default=0.05, validator=_non_negative)
    d2h_ms: float = attrs.field(default=0.02, validator=_non_negative)
    steps: int = 32

    def __attrs_post_init__(self) -> None:
        if self.gpu_ms <= 0:
            raise ConfigError("--gpu-ms", f"must be > 0, got {self.gpu_ms}")
        if self.steps < 2:
            raise ConfigError("--steps", f"must be >= 2 (one prefill, then decode steps), got {self.steps}")

    def cost_model(self) -> dict[str, float]:
        return {"cpu_prep_ms": self.cpu_ms * PREP_SHARE, "cpu_update_ms": self.cpu_ms * (1 - PREP_SHARE),
                "launch_eager_ms": self.launch_eager_ms, "launch_graph_ms": self.launch_graph_ms,
                "gpu_compute_ms": self.gpu_ms, "gpu_per_token_ms": 0.0, "h2d_ms": self.h2d_ms, "d2h_ms": self.d2h_ms}

    def launch(self, graphs: str) -> float:
        return self.launch_graph_ms if graphs != "eager" else self.launch_eager_ms

    def expected_sync(self, graphs: str = "eager") -> float:
        """One slot: host work, launch, copies and compute all take turns."""
        return self.gpu_ms / (self.gpu_ms + self.cpu_ms + self.launch(graphs) + self.h2d_ms + self.d2h_ms)

    def expected_overlap(self, graphs: str = "eager", streams: str = "three") -> float:
        """Two or more slots: the slower of the host loop and the compute stream sets the pace. On one stream
        the copies queue with compute, so they count on the device side."""
        device = self.gpu_ms + (self.h2d_ms + self.d2h_ms if streams == "one" else 0.0)
        return min(1.0, self.gpu_ms / max(device, self.cpu_ms + self.launch(graphs)))


@attrs.frozen
class StudyRow:
    buffers: str
    streams: str
    graphs: str
    busy: float | None
    tokens_per_s: float
    ms_per_step: float
    expected_busy: float
    steps: int


def _engine_config(costs: StudyCosts, buffers: Any, streams: str, graphs: str) -> Any:
    from ..core.config import EngineConfig

    blocks_per_request = -(-(PROMPT_LEN + costs.steps) // 16)
    return EngineConfig.from_dict({
        "model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "runtime": {"name": "sim", "order": "timed", "check": False, "cost": costs.cost_model()},
        "buffers": buffers, "streams": streams, "graphs": graphs, "attention": "sdpa",
        "cache": {"block_size": 16, "num_blocks": NUM_REQUESTS * blocks_per_request + 2},
        "batch": {"max_tokens": NUM_REQUESTS * PROMPT_LEN, "max_seqs": NUM_REQUESTS},
    }, key="engine")


def run_study(costs: StudyCosts, *, host: Any = None) -> list[StudyRow]:
    """Run all 18 combinations; each serves 8 requests for `steps` steps (one prefill, then decodes)."""
    import torch

    from ..core import models
    from ..core.config import ModelConfig
    from ..core.engine import Engine
    from ..core.plugin_host import get_plugin_host
    from ..core.types import Request, SamplingParams

    host = host or get_plugin_host()
    log = logging.getLogger("asyncbatch")
    level, threads = log.level, torch.get_num_threads()
    # Virtual time makes real speed irrelevant; one thread avoids oversubscribing a small, shared CPU.
    torch.set_num_threads(1)
    log.setLevel(max(level, logging.WARNING))
    try:
        model, _ = models.build_model(ModelConfig(preset="tiny", dtype="float32", device="cpu"), host)
        params = SamplingParams(max_new_tokens=costs.steps)
        requests = [Request(f"sim-{i}", tuple(range(1 + i, 1 + i + PROMPT_LEN)), params) for i in range(NUM_REQUESTS)]
        rows = []
        for label, buffers, slots in BUFFERS:
            for streams in STREAMS:
                for graphs in GRAPHS:
                    engine = Engine.from_model(model, _engine_config(costs, buffers, streams, graphs), host=host)
                    s = engine.run(requests).summary
                    expected = costs.expected_sync(graphs) if slots == 1 else costs.expected_overlap(graphs, streams)
                    rows.append(StudyRow(label, streams, graphs, s.compute_busy_fraction, s.tokens_per_s,
                                         s.wall_s * 1e3 / max(1, s.steps), expected, s.steps))
        return rows
    finally:
        torch.set_num_threads(threads)
        log.setLevel(level)


def study_table(costs: StudyCosts, rows: Sequence[StudyRow]) -> str:
    from .experiment import fmt, format_table

    c = costs
    table = format_table(
        ("buffers", "streams", "graphs", "busy", "expected", "virtual tok/s", "virtual ms/step"),
        [(r.buffers, r.streams, r.graphs, fmt(r.busy, 3), fmt(r.expected_busy, 3), fmt(r.tokens_per_s, 1),
          fmt(r.ms_per_step, 2)) for r in rows])
    host = c.cpu_ms + c.launch_eager_ms
    lines = [
        f"per-step costs: gpu {c.gpu_ms:g} ms; host cpu {c.cpu_ms:g} ms (prep {c.cpu_ms * PREP_SHARE:.3g} + update "
        f"{c.cpu_ms * (1 - PREP_SHARE):.3g}); launch eager {c.launch_eager_ms:g} / graph {c.launch_graph_ms:g} ms; "
        f"h2d {c.h2d_ms:g} ms, d2h {c.d2h_ms:g} ms; {NUM_REQUESTS} requests x {c.steps} steps",
        "",
        table,
        "",
        "busy = virtual compute-stream busy fraction (sim runtime, timed order); expected = analytic value:",
        f"  synchronous loop: gpu / (gpu + cpu + launch + copies) = {c.expected_sync('eager'):.3f} eager, "
        f"{c.expected_sync('per_slot'):.3f} with graphs",
        f"  overlapped loop:  min(1, gpu / max(gpu, cpu + launch)) = {c.expected_overlap('eager'):.3f} eager, "
        f"{c.expected_overlap('per_slot'):.3f} with graphs",
    ]
    if c.cpu_ms + c.launch_graph_ms >= c.gpu_ms:
        lines.append(f"  host-bound: host work per step ({host:g} ms eager) exceeds GPU work ({c.gpu_ms:g} ms), so "
                     "overlap cannot keep the GPU busy; only less host work per step can (bigger batches, graphs, "
                     "a faster scheduler).")
    elif host >= c.gpu_ms:
        lines.append(f"  host-bound when eager: cpu + eager launch ({host:g} ms) exceeds gpu ({c.gpu_ms:g} ms); "
                     "graphs bring the launch cost under it.")
    return "\n".join(lines)


def study_json(costs: StudyCosts, rows: Sequence[StudyRow]) -> dict[str, Any]:
    return {"costs": attrs.asdict(costs), "cost_model": costs.cost_model(), "requests": NUM_REQUESTS,
            "analytic": {"sync_eager": costs.expected_sync("eager"), "sync_graph": costs.expected_sync("per_slot"),
                         "overlap_eager": costs.expected_overlap("eager"),
                         "overlap_graph": costs.expected_overlap("per_slot")},
            "rows": [attrs.asdict(r) for r in rows]}
