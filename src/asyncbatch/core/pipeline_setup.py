"""What the pipeline sets up before its first step: the slots' buffers, the graph context that captures over them,
and the warm-up that runs every step shape in every slot so that a run replays and never captures.

Runs once per engine, never inside the step loop (`pipeline.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .interfaces import GraphPolicy
from .layout import HostBatchWriter, SlotLayout, StepShape
from .runtime.base import Runtime
from .step import DeviceBuffers, EngineGraphContext, Slot, StepBody


def build_slots(runtime: Runtime, num_slots: int, layout: SlotLayout, body: StepBody, *, compute_stream: Any,
                static_mixed: bool) -> tuple[list[Slot], EngineGraphContext]:
    """One `Slot` per buffer set (host buffers from the runtime, pinned where it copies asynchronously), and the
    graph context that captures `body` on `compute_stream`; graph policies may ask it for more device sets."""
    import torch

    i32 = torch.int32

    def make_buffers() -> DeviceBuffers:
        return DeviceBuffers(runtime.device_buffer(layout.numel, i32), runtime.device_buffer(layout.max_seqs, i32))

    slots = [Slot(i, runtime.host_buffer(layout.numel, i32), runtime.host_buffer(layout.max_seqs, i32),
                  make_buffers()) for i in range(num_slots)]
    graph_ctx = EngineGraphContext(body, slots, make_buffers, lambda fn: runtime.capture(fn, compute_stream),
                                   static_mixed=static_mixed)
    return slots, graph_ctx


def warm_up(runtime: Runtime, streams: dict[str, Any], slots: list[Slot], writer: HostBatchWriter,
            graphs: GraphPolicy, shapes: list[StepShape], *, on_shape: Callable[[], None] | None = None) -> int:
    """Run (and so capture, under a graph policy) each shape on padding-only inputs in every slot, largest first so
    that the shared pool is sized once. Returns the number of runs; `on_shape` is called after each."""
    count = 0
    for s, slot in enumerate(slots):
        for shape in sorted(shapes, key=lambda x: (x.tokens, x.seqs, x.kv_blocks), reverse=True):
            writer.write(slot.host_in, [], shape)
            h2d = runtime.launch("h2d", streams["h2d"],
                                 lambda slot=slot: slot.device.inputs.copy_(slot.host_in, non_blocking=True))
            ev = runtime.launch("warmup", streams["compute"], lambda s=s, shape=shape: graphs.run(s, shape),
                                waits=[h2d])
            runtime.host_wait(ev)
            count += 1
            if on_shape is not None:
                on_shape()
    runtime.synchronize()
    return count
