"""The packed input layout of one slot, and the host writer that fills it.

All per-step inputs live in one flat int32 buffer per slot (floats bit-cast), so each step needs exactly one
host-to-device copy, and device views of it keep fixed addresses for graph capture. Padding is self-describing:
padded tokens have `token_seq == -1` and write KV into the reserved trash block 0; padded sequences have zero
query length, `seq_len == 0` and scatter their (garbage) token into the trash row.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import attrs

from .scheduling import BatchEntry

TOKEN_FIELDS = ("input_ids", "carry_row", "positions", "slot_mapping", "token_seq")
SEQ_FIELDS = ("logits_index", "out_row", "seq_len", "query_start", "seq_row")
ROW_PARAM_FIELDS = ("temperature", "top_k", "top_p", "seed_lo", "seed_hi")  # per row, gathered per step
SEQ_EXTRA = ("sample_index",)


@attrs.frozen
class StepShape:
    """The padded shape of one step: every Python scalar a captured step bakes in. Graph keys are StepShapes.

    `kv_blocks` is 0 unless the attention backend's launch depends on the context length (then it is the padded
    number of blocks per sequence). `sample_mode` is `greedy`, `sample` or `filter` (top-k/top-p).
    """

    tokens: int
    seqs: int
    max_query: int
    kv_blocks: int
    sample_mode: str
    is_decode: bool


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def _split_seed(seed: int) -> tuple[int, int]:
    lo = seed & 0xFFFFFFFF
    hi = (seed >> 32) & 0xFFFFFFFF
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


class SlotLayout:
    """Offsets of every field inside a slot's flat buffer, for `max_tokens` tokens and `max_seqs` sequences."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_blocks = max_blocks
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name in TOKEN_FIELDS:
            offsets[name] = (pos, max_tokens)
            pos += max_tokens
        for name in (*SEQ_FIELDS, *ROW_PARAM_FIELDS, *SEQ_EXTRA):
            n = max_seqs + 1 if name == "query_start" else max_seqs
            offsets[name] = (pos, n)
            pos += n
        offsets["block_table"] = (pos, max_seqs * max_blocks)
        pos += max_seqs * max_blocks
        self.offsets = offsets
        self.numel = pos

    def views(self, buf: Any, shape: StepShape | None = None) -> SimpleNamespace:
        """Views of `buf` per field; with a shape, sliced to the padded extent (fixed addresses for graphs)."""
        out = {}
        for name, (off, n) in self.offsets.items():
            v = buf[off : off + n]
            if shape is not None:
                if name in TOKEN_FIELDS:
                    v = v[: shape.tokens]
                elif name == "query_start":
                    v = v[: shape.seqs + 1]
                elif name == "block_table":
                    v = v[: shape.seqs * self.max_blocks].view(shape.seqs, self.max_blocks)
                else:
                    v = v[: shape.seqs]
            out[name] = v
        return SimpleNamespace(**out)


class HostBatchWriter:
    """Writes a batch's entries into a slot's host buffer. Keeps per-row tables (blocks, sampling parameters)
    on the host so that a step copies rows with one gather instead of rebuilding them in Python.

    This runs on the host for every step, inside the slack the slots give it: it writes through numpy views of
    the (pinned) buffers, a few vectorised assignments per field, rather than dozens of small torch ops whose
    dispatch alone would cost most of a millisecond."""

    def __init__(self, layout: SlotLayout, num_rows: int, block_size: int) -> None:
        import numpy as np
        import torch

        self.layout = layout
        self.block_size = block_size
        self.trash_row = num_rows  # rows 0..num_rows-1 belong to requests; the last one is trash
        self.row_blocks = torch.zeros(num_rows + 1, layout.max_blocks, dtype=torch.int32)
        self.row_params = torch.zeros(num_rows + 1, len(ROW_PARAM_FIELDS), dtype=torch.int32)
        self.row_params[:, 2] = _f32_bits(1.0)
        self._blocks = self.row_blocks.numpy()  # the same memory
        self._params = self.row_params.numpy()
        self._views: dict[int, SimpleNamespace] = {}
        self._arange = np.arange(max(layout.max_tokens, layout.max_seqs) + 1, dtype=np.int32)

    def bind_row(self, row: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        """Called when a request takes a row: reset its block list, store its sampling parameters."""
        self._blocks[row] = 0
        lo, hi = _split_seed(seed)
        self._params[row] = (_f32_bits(temperature), top_k, _f32_bits(top_p), lo, hi)

    def add_blocks(self, row: int, first_index: int, blocks: Sequence[int]) -> None:
        if blocks:
            self._blocks[row, first_index : first_index + len(blocks)] = blocks

    def _numpy_views(self, buf: Any) -> SimpleNamespace:
        """numpy views of every field of `buf` (a slot's host buffer lives as long as the engine: cached)."""
        key = buf.data_ptr()
        views = self._views.get(key)
        if views is None:
            flat = buf.numpy()
            views = SimpleNamespace(**{name: flat[off : off + n] for name, (off, n) in self.layout.offsets.items()})
            self._views[key] = views
        return views

    def write(self, buf: Any, entries: Sequence[BatchEntry], shape: StepShape) -> None:
        import numpy as np

        bs = self.block_size
        ids: list[int] = []
        carry: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        starts: list[int] = []
        rows: list[int] = []
        out_rows: list[int] = []
        sample_index: list[int] = []
        trash = self.trash_row
        for e in entries:
            req, start, n = e.req, e.start, e.num_tokens
            toks = req.tokens
            known_end = min(start + n, len(toks))
            if known_end > start:
                ids.extend(toks[start:known_end])
                carry.extend([-1] * (known_end - start))
            if start + n > known_end:  # the newest token is still on the device: gather it from its row
                ids.append(0)
                carry.append(e.row)
            blocks = req.blocks
            if n == 1:
                slots.append(blocks[start // bs] * bs + start % bs)
            else:
                slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            qlens.append(n)
            starts.append(start)
            rows.append(e.row)
            out_rows.append(e.row if e.samples else trash)
            sample_index.append(req.num_generated - 1 if e.samples else 0)

        T, B = shape.tokens, shape.seqs
        nt, ns = len(ids), len(entries)
        v = self._numpy_views(buf)
        v.input_ids[:nt] = ids
        v.input_ids[nt:T] = 0
        v.carry_row[:nt] = carry
        v.carry_row[nt:T] = -1
        v.slot_mapping[:nt] = slots
        v.slot_mapping[nt:T] = 0
        qlen = np.array(qlens, dtype=np.int32)
        start = np.array(starts, dtype=np.int32)
        cu = v.query_start
        cu[0] = 0
        np.cumsum(qlen, out=cu[1 : ns + 1])
        cu[ns + 1 : B + 1] = cu[ns]
        v.token_seq[:nt] = np.repeat(self._arange[:ns], qlen)
        v.token_seq[nt:T] = -1
        # Position of each token: its sequence's start, plus its index within the sequence's chunk.
        v.positions[:nt] = np.repeat(start - cu[:ns], qlen) + self._arange[:nt]
        v.positions[nt:T] = 0
        v.logits_index[:ns] = cu[1 : ns + 1] - 1
        v.logits_index[ns:B] = 0
        v.seq_len[:ns] = start + qlen
        v.seq_len[ns:B] = 0
        row_index = np.array(rows + [trash] * (B - ns), dtype=np.intp)
        v.seq_row[:B] = row_index
        v.out_row[:ns] = out_rows
        v.out_row[ns:B] = trash
        v.sample_index[:ns] = sample_index
        v.sample_index[ns:B] = 0
        params = self._params[row_index]
        for j, name in enumerate(ROW_PARAM_FIELDS):
            getattr(v, name)[:B] = params[:, j]
        nb = self.layout.max_blocks
        v.block_table[: B * nb].reshape(B, nb)[:] = self._blocks[row_index]
