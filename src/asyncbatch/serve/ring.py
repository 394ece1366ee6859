"""`StepRing`: the per-step token batches from the engine's process to the front end, through shared memory.

One writer (the step loop) and one reader (the front end's reader thread). A step is written as fixed-layout
binary, with no pickling and no system call: a header of doubles (clock readings, the step's stats, the engine's
counts), then three int32 arrays (request handles, token ids, token indices), then, only when the step has any,
a pickled `(finish reasons, outputs)`. The writer publishes a message by advancing a 64-bit write position after
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
_HEAD = struct.Struct(f"<IIII{2 + len(STATS_FIELDS) + NUM_COUNTS}d")  # size, tokens, extra, has stats; doubles
_POS = struct.Struct("<Q")
_STEPS: dict[int, struct.Struct] = {}  # a step of n tokens: the header, then the three arrays, packed in one call
_WRAP = 0xFFFFFFFF
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_READ_AT = 64  # the write position is at 0, the read position a cache line further: each side stores to its own line
_CONTROL = 128


_NO_STATS = (0.0,) * len(STATS_FIELDS)
_stats_values = operator.attrgetter(*(f.name for f in STATS_FIELDS))  # one C call for every field
_NONE_FIELDS = tuple(i for i, f in enumerate(STATS_FIELDS) if "None" in str(f.type))


def _stats_doubles(stats: StepStats | None) -> tuple:
    if stats is None:
        return _NO_STATS
    values = _stats_values(stats)
    for i in _NONE_FIELDS:  # the only fields that may be None (compute_s): NaN stands for it
        if values[i] is None:
            values = (*values[:i], math.nan, *values[i + 1 :])
    return values


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
        self._buf = self.shm.buf  # SharedMemory's own view (no slice of it is kept: close() must find no export)
        self._write = _POS.unpack_from(self._buf, 0)[0]
        self._read = _POS.unpack_from(self._buf, _READ_AT)[0]

    # ---- the writer (the step loop)
    def write(self, seen: float, run_time: float, handles: Sequence[int], tokens: Sequence[int], indices: Sequence[int],
              extra: tuple | None, stats: StepStats | None, counts: tuple) -> bool:
        """Publish one step; False (nothing written) if it does not fit now, or the ring is not `enabled`."""
        if not self.enabled:
            return False
        n = len(tokens)
        blob = pickle.dumps(extra, protocol=pickle.HIGHEST_PROTOCOL) if extra is not None else b""
        need = _HEAD.size + 12 * n + len(blob)
        pos = self._write
        offset = pos % self.size + _CONTROL
        skip = self.size + _CONTROL - offset if offset + need > self.size + _CONTROL else 0
        read = _POS.unpack_from(self._buf, _READ_AT)[0]
        if pos + skip + need - read > self.size:
            return False
        if skip:
            if skip >= 4:
                struct.pack_into("<I", self._buf, offset, _WRAP)
            pos += skip
            offset = _CONTROL
        layout = _STEPS.get(n) or _STEPS.setdefault(n, struct.Struct(f"{_HEAD.format}{3 * n}i"))
        layout.pack_into(self._buf, offset, need, n, len(blob), stats is not None, seen, run_time,
                         *_stats_doubles(stats), *counts, *handles, *tokens, *indices)
        if blob:
            start = offset + layout.size
            self._buf[start : start + len(blob)] = blob
        self._write = pos + need
        _POS.pack_into(self._buf, 0, self._write)  # last: the reader sees the message whole or not at all
        return True

    # ---- the reader (the front end)
    def read_all(self) -> list[tuple]:
        """Every step published since the last call, oldest first, as the tuples `RemoteEngine._step` takes."""
        out = []
        end = _POS.unpack_from(self._buf, 0)[0]
        pos = self._read
        while pos < end:
            offset = pos % self.size + _CONTROL
            room = self.size + _CONTROL - offset
            if room < 4 or struct.unpack_from("<I", self._buf, offset)[0] == _WRAP:
                pos += room
                continue
            head = _HEAD.unpack_from(self._buf, offset)
            need, n, blob_len, has_stats = head[:4]
            seen, run_time = head[4], head[5]
            stats_values = head[6 : 6 + len(STATS_FIELDS)]
            counts = head[6 + len(STATS_FIELDS) :]
            start = offset + _HEAD.size
            arrays = struct.unpack_from(f"<{3 * n}i", self._buf, start)
            reasons, outputs = ({}, [])
            if blob_len:
                reasons, outputs = pickle.loads(self._buf[start + 12 * n : start + 12 * n + blob_len])
            out.append((seen, run_time, list(arrays[:n]), list(arrays[n : 2 * n]), list(arrays[2 * n :]), reasons,
                        outputs, _stats_from(stats_values) if has_stats else None, _counts(counts)))
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
