"""The device side of one step: slot buffers, the compute body (carry-in, forward, sampling, scatter), and the
`GraphContext` handed to graph policies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .attention_api import CONTEXT_KWARG, AttentionContext, AttentionMetadata
from .interfaces import GraphContext
from .layout import SlotLayout, StepShape
from .sampling import sample


@attrs.define(eq=False)
class DeviceBuffers:
    """One set of device buffers: packed inputs and sampled-token outputs."""

    inputs: Any
    outputs: Any


@attrs.define(eq=False)
class Slot:
    """Host and device buffers of one slot. Host buffers are pinned where the runtime copies asynchronously."""

    index: int
    host_in: Any
    host_out: Any
    device: DeviceBuffers


class StepBody:
    """Runs one step on a buffer set. Called inside the compute op (and inside graph capture).

    Reads only `bufs.inputs`, `last_token` and the KV cache; writes `bufs.outputs`, `last_token` and the KV cache.
    Never synchronises with the host.
    """

    def __init__(self, model: Any, layout: SlotLayout, attn: AttentionContext, last_token: Any,
                 block_size: int, *, pass_context: bool = True) -> None:
        self.model = model
        # Compiled layers read the active context instead (see attention_api.activate).
        self.extra = {CONTEXT_KWARG: attn} if pass_context else {}
        self.layout = layout
        self.attn = attn
        self.last_token = last_token
        self.block_size = block_size

    def __call__(self, bufs: DeviceBuffers, shape: StepShape) -> None:
        import torch

        v = self.layout.views(bufs.inputs, shape)
        carry = v.carry_row
        pending = self.last_token.index_select(0, carry.clamp(min=0).long())
        ids = torch.where(carry >= 0, pending, v.input_ids).long()
        self.attn.meta = AttentionMetadata(
            positions=v.positions, slot_mapping=v.slot_mapping.long(), token_seq=v.token_seq,
            seq_len=v.seq_len, query_start=v.query_start, block_table=v.block_table,
            max_query=shape.max_query, kv_blocks=shape.kv_blocks, block_size=self.block_size)
        out = self.model(input_ids=ids[None], position_ids=v.positions.long()[None], use_cache=False,
                         logits_to_keep=v.logits_index.long(), **self.extra)
        tokens = sample(out.logits[0], shape.sample_mode, v).to(torch.int32)
        bufs.outputs[: shape.seqs].copy_(tokens)
        self.last_token.index_copy_(0, v.out_row.long(), tokens)


class EngineGraphContext(GraphContext):
    """The engine's side of the graph-policy contract."""

    def __init__(self, body: StepBody, slots: list[Slot], make_buffers: Callable[[], DeviceBuffers],
                 capture: Callable[[Callable[[], None]], Any], *, static_mixed: bool = False) -> None:
        self.static_mixed = static_mixed
        self._body = body
        self._slots = slots
        self._make = make_buffers
        self._capture = capture

    def body(self, slot_buffers: DeviceBuffers, shape: StepShape) -> None:
        self._body(slot_buffers, shape)

    def slot_buffers(self, slot: int) -> DeviceBuffers:
        return self._slots[slot].device

    def new_buffers(self) -> DeviceBuffers:
        return self._make()

    def copy_buffers(self, src: DeviceBuffers, dst: DeviceBuffers, *, inputs: bool) -> None:
        if inputs:
            dst.inputs.copy_(src.inputs, non_blocking=True)
        else:
            dst.outputs.copy_(src.outputs, non_blocking=True)

    def capture(self, fn: Callable[[], None]) -> Any:
        return self._capture(fn)
