"""`StepRing`: the per-step token batches from the engine's process to the front end, through shared memory.

One writer (the step loop) and one reader (the front end's reader thread). A step is written as fixed-layout
binary in one `pack_into`, with no pickling and no system call: a header (sizes, two clock readings), the stats
of the steps since the last message that carried any (the engine sends them in batches) as doubles, the engine's
counts only when they changed, then the delivered tokens as int32 pairs (request handle, token id), then, only when
the step has any, a pickled `(finish reasons, outputs)`. A token's
index is not sent: the front end counts the tokens it has received for each request, and the engine sends every
delivered token once, in order. The writer publishes a message by advancing a 64-bit write position after
the bytes are in place; the reader reads up to that position and publishes its own read position, which tells the
writer how much room is left. Positions only grow; a message never wraps around the end of the buffer (the writer
skips to the start and leaves a marker). On x86 a store is never seen before the stores that precede it, which is
all this needs; the reader and writer each store only their own position. Processors that may reorder stores
(Arm, as on Grace Hopper) get no such promise, and Python has no fence to ask for one: there the ring takes
nothing (`enabled` is False) and every step goes by the pipe, whose system calls order memory.

When a message does not fit (the reader is far behind), `write` returns False and the caller sends it by the
pipe instead; the reader drains the ring before it handles any pipe message, so order is kept.
"""

from __future__ import annotations

import math
import operator
import pickle
import platform
import struct
from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import Any

import attrs

from ..core.stats import StepStats

STATS_FIELDS = tuple(attrs.fields(StepStats))
NUM_COUNTS = 8  # waiting, running, KV blocks used and in all, adds handled, loop CPU, process CPU, hand-over time
_HEAD = struct.Struct("<IIIII2d")  # size, tokens, extra's size, stats, has counts; seen, run time
_SIZES = struct.Struct("<IIIII")
_COUNTS = f"{NUM_COUNTS}d"
_POS = struct.Struct("<Q")
_STEPS: dict[int, struct.Struct] = {}  # _key(tokens, stats, has counts) -> the whole fixed part, packed in one call
_WRAP = 0xFFFFFFFF
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_READ_AT = 64  # the write position is at 0, the read position a cache line further: each side stores to its own line
_CONTROL = 128


_stats_values = operator.attrgetter(*(f.name for f in STATS_FIELDS))  # one C call for every field
_NONE_FIELDS = tuple(i for i, f in enumerate(STATS_FIELDS) if "None" in str(f.type))


def _key(n: int, k: int, has_counts: bool) -> int:
    return (n << 16 | k) << 1 | has_counts  # `write_tokens` computes it inline for k = 0


def _layout(n: int, k: int, has_counts: bool) -> struct.Struct:
    layout = _STEPS.get(_key(n, k, has_counts))
    if layout is None:
        layout = _STEPS[_key(n, k, has_counts)] = struct.Struct(
            f"{_HEAD.format}{k * len(STATS_FIELDS)}d{_COUNTS if has_counts else ''}{2 * n}i")
    return layout


def _stats_doubles(stats: Sequence[StepStats]) -> list:
    out: list = []
    for one in stats:
        out += _stats_values(one)
        for i in _NONE_FIELDS:  # the only fields that may be None (compute_s): NaN stands for it
            if out[i - len(STATS_FIELDS)] is None:
                out[i - len(STATS_FIELDS)] = math.nan
    return out


def _stats_from(values: tuple[float, ...]) -> StepStats:
    kwargs: dict[str, Any] = {}
    for f, v in zip(STATS_FIELDS, values):
        kind = str(f.type)
        if math.isnan(v):
            kwargs[f.name] = None
        elif kind == "bool":
            kwargs[f.name] = bool(v)
        elif kind == "int":
            kwargs[f.name] = int(v)
        else:
            kwargs[f.name] = v
    return StepStats(**kwargs)


class StepRing:
    """Create it in the engine's process (`StepRing(size)`); the front end attaches by `StepRing(name=...)`."""

    def __init__(self, size: int = 4 << 20, *, name: str | None = None, enabled: bool = ORDERED_STORES) -> None:
        self.enabled = enabled
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=_CONTROL + size)
            self.shm.buf[:_CONTROL] = bytes(_CONTROL)
        else:
            # A spawned process shares its parent's resource tracker, which already knows the segment: attaching
            # adds nothing there, and the creator's unlink removes it once.
            self.shm = shared_memory.SharedMemory(name=name)
        self.name = self.shm.name
        self.size = self.shm.size - _CONTROL
        self._end = self.shm.size  # a message never runs past here
        self._buf = self.shm.buf  # SharedMemory's own view (no slice of it is kept: close() must find no export)
        self._write = _POS.unpack_from(self._buf, 0)[0]
        self._read = _POS.unpack_from(self._buf, _READ_AT)[0]  # the writer's last reading of it; the reader's own

    # ---- the writer (the step loop)
    def write(self, seen: float, run_time: float, pairs: Sequence[int], extra: tuple | None,
              stats: Sequence[StepStats], counts: tuple | None) -> bool:
        """Publish one step: `pairs` is the delivered tokens as handle, token, handle, token...; `stats` the steps'
        stats to send with it (none on most steps); `counts` None when they did not change. False (nothing
        written) if it does not fit now, or the ring is not `enabled`."""
        if not self.enabled:
            return False
        n = len(pairs) >> 1
        k = len(stats)
        has_counts = counts is not None
        layout = _STEPS.get(_key(n, k, has_counts)) or _layout(n, k, has_counts)
        blob = pickle.dumps(extra, protocol=pickle.HIGHEST_PROTOCOL) if extra is not None else None
        need = layout.size + len(blob) if blob else layout.size
        pos = self._write
        offset = pos % self.size + _CONTROL
        skip = self._end - offset if offset + need > self._end else 0
        # The reader's position is read from its cache line only when the last reading leaves too little room: the
        # line lives in the reader's core, and a step costs the writer one transfer fewer.
        if pos + skip + need - self._read > self.size:
            self._read = _POS.unpack_from(self._buf, _READ_AT)[0]
            if pos + skip + need - self._read > self.size:
                return False
        if skip:
            if skip >= 4:
                struct.pack_into("<I", self._buf, offset, _WRAP)
            pos += skip
            offset = _CONTROL
        layout.pack_into(self._buf, offset, need, n, len(blob) if blob else 0, k, has_counts, seen, run_time,
                         *(_stats_doubles(stats) if k else ()), *(counts or ()), *pairs)
        if blob:
            start = offset + layout.size
            self._buf[start : start + len(blob)] = blob
        self._write = pos + need
        _POS.pack_into(self._buf, 0, self._write)  # last: the reader sees the message whole or not at all
        return True

    def write_tokens(self, seen: float, run_time: float, pairs: Sequence[int], counts: tuple | None) -> bool:
        """`write` for the common step, which carries no stats and no extra: the same message in fewer steps (every
        line of Python counts on the step loop's thread). A wrap or too little room takes `write`."""
        has_counts = counts is not None
        n = len(pairs) >> 1
        layout = _STEPS.get(n << 17 | has_counts) or _layout(n, 0, has_counts)
        pos = self._write
        offset = pos % self.size + _CONTROL
        if not self.enabled or offset + layout.size > self._end or pos + layout.size - self._read > self.size:
            return self.write(seen, run_time, pairs, None, (), counts)
        layout.pack_into(self._buf, offset, layout.size, n, 0, 0, has_counts, seen, run_time, *(counts or ()), *pairs)
        self._write = pos + layout.size
        _POS.pack_into(self._buf, 0, self._write)  # last: the reader sees the message whole or not at all
        return True

    # ---- the reader (the front end)
    def read_all(self) -> list[tuple]:
        """Every step published since the last call, oldest first, as the tuples `RemoteEngine._step` takes:
        `(seen, run_time, pairs, reasons, outputs, stats, counts or None)`."""
        out = []
        end = _POS.unpack_from(self._buf, 0)[0]
        pos = self._read
        width = len(STATS_FIELDS)
        while pos < end:
            offset = pos % self.size + _CONTROL
            room = self.size + _CONTROL - offset
            if room < 4 or struct.unpack_from("<I", self._buf, offset)[0] == _WRAP:
                pos += room
                continue
            need, n, blob_len, k, has_counts = _SIZES.unpack_from(self._buf, offset)
            layout = _layout(n, k, bool(has_counts))
            values = layout.unpack_from(self._buf, offset)
            at = 7  # past the header's five sizes and two clock readings
            stats = [_stats_from(values[at + i * width : at + (i + 1) * width]) for i in range(k)]
            at += k * width
            counts = None
            if has_counts:
                counts = _counts(values[at : at + NUM_COUNTS])
                at += NUM_COUNTS
            reasons, outputs = ({}, [])
            if blob_len:
                start = offset + layout.size
                reasons, outputs = pickle.loads(self._buf[start : start + blob_len])
            out.append((values[5], values[6], list(values[at:]), reasons, outputs, stats, counts))
            pos += need
        if pos != self._read:
            self._read = pos
            _POS.pack_into(self._buf, _READ_AT, pos)  # after reading: the writer may reuse the space
        return out

    def close(self, *, unlink: bool = False) -> None:
        del self._buf
        self.shm.close()
        if unlink:
            self.shm.unlink()


def _counts(values: tuple[float, ...]) -> tuple:
    return (*(int(v) for v in values[:5]), *values[5:])
