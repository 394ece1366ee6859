"""Built-in graph policies: run the compute step eagerly, or replay captured graphs.

A captured step bakes in the buffer addresses it ran on and every Python scalar of its `StepShape`, so graphs are
keyed by the whole shape (and, for `per_slot`, by the slot). All graphs share one memory pool; replays are ordered
by the pipeline's `pool` edge, so they never overlap.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from ..core.errors import ConfigError
from ..core.interfaces import GraphContext, GraphPolicy
from ..core.layout import StepShape

log = logging.getLogger("asyncbatch")


def _positive(_: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ConfigError(f"graphs.{attribute.name}", f"must be >= 1, got {value}")


@attrs.frozen
class EagerConfig:
    """No graphs: every step launches its kernels one by one."""


class Eager(GraphPolicy):
    """No capture: every kernel is launched from Python each step."""

    Config = EagerConfig

    def __init__(self, config: EagerConfig | None = None) -> None:
        self.ctx: GraphContext | None = None

    def bind(self, ctx: GraphContext) -> None:
        self.ctx = ctx

    def run(self, slot: int, shape: StepShape) -> bool:
        self.ctx.body(self.ctx.slot_buffers(slot), shape)
        return False


@attrs.frozen
class CaptureConfig:
    """`max_capture_tokens`: steps with more (padded) tokens run eagerly (big prefills gain little from graphs
    and would hold large pool memory). `decode_only`: capture only steps where every sequence feeds one token."""

    max_capture_tokens: int = attrs.field(default=512, validator=_positive)
    decode_only: bool = False


class _Capturing(GraphPolicy):
    Config = CaptureConfig

    def __init__(self, config: CaptureConfig | None = None) -> None:
        self.config = config or CaptureConfig()
        self.ctx: GraphContext | None = None
        self.graphs: dict[Any, Any] = {}
        self.captures = 0  # graphs captured so far (a warmed engine captures none during a run)
        self._disabled: str | None = None

    def bind(self, ctx: GraphContext) -> None:
        self.ctx = ctx

    def uses_graph(self, shape: StepShape) -> bool:
        if self._disabled or shape.tokens > self.config.max_capture_tokens:
            return False
        return shape.is_decode or not self.config.decode_only

    def num_graphs(self) -> int:
        return len(self.graphs)

    def _replay_or_capture(self, key: Any, bufs: Any, shape: StepShape) -> bool:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return True
        # First time: run eagerly (this computes the step and warms kernels up), then capture for next time.
        ctx = self.ctx
        ctx.body(bufs, shape)
        try:
            graph = ctx.capture(lambda: ctx.body(bufs, shape))
        except Exception as exc:  # e.g. an op that cannot be captured: keep running, eagerly, and say so
            self._disabled = f"{type(exc).__name__}: {exc}"
            log.warning("graph capture failed (%s); the graph policy runs eagerly from now on", self._disabled)
            return False
        if graph is None:
            self._disabled = "the runtime has no graphs"
            log.warning("runtime has no graphs: the graph policy runs eagerly")
            return False
        self.graphs[key] = graph
        self.captures += 1
        return False


class PerSlot(_Capturing):
    """One graph set per slot, keyed by (slot, shape); all graphs in one shared memory pool."""

    def key(self, slot: int, shape: StepShape) -> Any:
        return (slot, shape)

    def run(self, slot: int, shape: StepShape) -> bool:
        bufs = self.ctx.slot_buffers(slot)
        if not self.uses_graph(shape):
            self.ctx.body(bufs, shape)
            return False
        return self._replay_or_capture(self.key(slot, shape), bufs, shape)

    def resources(self, slot: int) -> list[tuple[Any, str]]:
        return [(("graph_pool",), "w")]


class Staged(_Capturing):
    """One graph set for all slots: slot inputs are copied into a staging set on the device, the graph runs
    there, outputs are copied back. Fewer graphs and less memory than `per_slot`, two device copies per step."""

    def bind(self, ctx: GraphContext) -> None:
        super().bind(ctx)
        self.stage = ctx.new_buffers()

    def key(self, slot: int, shape: StepShape) -> Any:
        return shape

    def run(self, slot: int, shape: StepShape) -> bool:
        ctx = self.ctx
        bufs = ctx.slot_buffers(slot)
        if not self.uses_graph(shape):
            ctx.body(bufs, shape)
            return False
        ctx.copy_buffers(bufs, self.stage, inputs=True)
        replayed = self._replay_or_capture(self.key(slot, shape), self.stage, shape)
        ctx.copy_buffers(self.stage, bufs, inputs=False)
        return replayed

    def resources(self, slot: int) -> list[tuple[Any, str]]:
        return [(("graph_pool",), "w"), (("stage",), "w")]


@attrs.frozen
class MixedConfig:
    """`max_capture_tokens`: steps with more padded tokens run eagerly (null: every step up to `batch.max_tokens`
    is captured; the pool is sized by the largest)."""

    max_capture_tokens: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))


class Mixed(PerSlot):
    """Full-step graphs for decode and mixed prefill+decode steps alike: one graph set per slot in the shared pool.

    A step holding prefill chunks has its own padded shape, one per token bucket, because the attention backend
    reads every sequence's query and context length on the device (its launch depends on padded counts only).
    So the whole step, attention included, is one replay, and every shape is known before the run: the engine
    captures them all at start-up. Where the backend bakes lengths into its launch, mixed steps run eagerly
    (said once at build).
    """

    Config = MixedConfig

    def __init__(self, config: MixedConfig | None = None) -> None:
        super().__init__()
        self.max_tokens = (config or MixedConfig()).max_capture_tokens

    def bind(self, ctx: GraphContext) -> None:
        super().bind(ctx)
        if not ctx.static_mixed:
            log.info("graphs 'mixed': the attention backend bakes query or context lengths into its launch, so "
                     "steps holding prefill chunks run eagerly (the triton backend captures them)")

    def uses_graph(self, shape: StepShape) -> bool:
        if self._disabled or (self.max_tokens is not None and shape.tokens > self.max_tokens):
            return False
        return shape.is_decode or self.ctx.static_mixed
