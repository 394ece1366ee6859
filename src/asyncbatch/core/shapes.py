"""The padded shape of each step: the one set of padding rules that runs, graph keys and warm-up all follow.

Tokens pad to the configured buckets; sequences pad with them (up to `max_seqs`). A backend whose launch depends
on padded counts only (`has_static_launch`) gets one shape per token bucket even for steps holding prefill
chunks; otherwise the longest query is padded to a power of two. Backends that bake the context length into a
launch (`needs_kv_blocks`) also key on the padded number of KV blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .layout import SlotLayout, StepShape
from .scheduling import BatchEntry


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class StepShapes:
    """Shapes of steps for one engine: `of(entries)` for a planned batch, `enumerate(modes)` for every one."""

    def __init__(self, batch: Any, layout: SlotLayout, backend: Any, block_size: int) -> None:
        self.batch_cfg, self.layout, self.backend, self.block_size = batch, layout, backend, block_size

    def of(self, entries: list[BatchEntry]) -> StepShape:
        cfg = self.batch_cfg
        T = sum(e.num_tokens for e in entries)
        B = len(entries)
        t_pad = cfg.pad_tokens(T)
        b_pad = min(cfg.pad_tokens(B), self.layout.max_seqs)
        decode = T == B
        if decode:
            max_q = 1
        elif self.backend.has_static_launch:
            # The launch depends on padded counts only: one shape per token bucket (padded sequences cost nothing
            # but their sampling row), so every mixed step has a shape that was captured ahead of the run.
            max_q = t_pad
            b_pad = min(t_pad, self.layout.max_seqs)
        else:
            max_q = min(pow2(max(e.num_tokens for e in entries)), t_pad)
        kv = 0
        if self.backend.needs_kv_blocks:
            most = max(-(-(e.start + e.num_tokens) // self.block_size) for e in entries)
            kv = min(pow2(most), self.layout.max_blocks)
        modes = {e.req.params.sample_mode for e in entries if e.samples}
        mode = "filter" if "filter" in modes else "sample" if "sample" in modes else "greedy"
        return StepShape(t_pad, b_pad, max_q, kv, mode, decode)

    def enumerate(self, modes: Sequence[str]) -> tuple[list[StepShape], bool]:
        """Every shape `of` can give a step with sampling path in `modes`, and whether that list is complete.

        Decode steps: one shape per token bucket up to `max_seqs` (times the context buckets where the backend
        bakes them in). Steps holding prefill chunks: one shape per token bucket where the backend's launch depends
        on padded counts only; otherwise their shapes are not enumerable and the list is incomplete.
        """
        cfg, max_seqs = self.batch_cfg, self.layout.max_seqs
        kvs = [0]
        if self.backend.needs_kv_blocks:
            kvs = sorted({min(pow2(n), self.layout.max_blocks) for n in range(1, self.layout.max_blocks + 1)})
        decode_buckets = sorted({cfg.pad_tokens(b) for b in range(1, max_seqs + 1)})
        shapes = [StepShape(t, min(t, max_seqs), 1, kv, mode, True)
                  for mode in modes for t in decode_buckets for kv in kvs]
        static = self.backend.has_static_launch
        if static:
            shapes += [StepShape(t, min(t, max_seqs), t, 0, mode, False) for mode in modes for t in cfg.buckets()
                       if t >= 2]
        return shapes, static
