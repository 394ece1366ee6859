"""Ranks of a lamport all-reduce group as CPU processes under Triton's interpreter (`test_lamport_all_reduce`).

Each rank's buffer is a CPU tensor in shared memory. Every process maps them at addresses of its own, so each
builds its own address table, as symmetric memory gives each GPU its own view of its peers' buffers. The
kernel's pushes into peers' buffers and its polling of its own then cross real process boundaries.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch


def make_group(world: int, cap: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's buffer, set to the sentinel, and its counters: all in shared memory."""
    from asyncbatch.parallel import lamport

    bufs = [torch.full((lamport.SLOTS * world * cap,), lamport.sentinel(dtype), dtype=lamport.bits_dtype(dtype))
            .share_memory_() for _ in range(world)]
    states = [torch.zeros(lamport.STATE_INTS, dtype=torch.int32).share_memory_() for _ in range(world)]
    return bufs, states


def rank_main(rank: int, world: int, cap: int, bufs: list, states: list, calls: list, outs: list) -> None:
    """Make every call of `calls` (one input per rank each) as rank `rank`; write each sum into `outs`."""
    from asyncbatch.parallel import lamport

    table = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    for inputs, out in zip(calls, outs, strict=True):
        out[rank].copy_(lamport.all_reduce(inputs[rank], table, states[rank], rank=rank, world=world, cap=cap,
                                           trap=False))


@contextmanager
def interpreted_children():
    """Processes started inside get Triton's interpreter (the variable is read when they import triton)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def run_ranks(world: int, cap: int, calls: list[list[torch.Tensor]], *, ranks: Any = None,
              timeout_s: float = 240) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.Tensor],
                                               list[int | None]]:
    """Run `calls` on a group of `world` processes (only `ranks` of them, if given). Returns every call's output
    per rank, the buffers, the counters and the exit codes."""
    import torch.multiprocessing as mp

    bufs, states = make_group(world, cap, calls[0][0].dtype)
    calls = [[x.share_memory_() for x in call] for call in calls]
    outs = [[torch.zeros_like(x).share_memory_() for x in call] for call in calls]
    ctx = mp.get_context("spawn")
    with interpreted_children():
        procs = [ctx.Process(target=rank_main, args=(r, world, cap, bufs, states, calls, outs))
                 for r in (range(world) if ranks is None else ranks)]
        for p in procs:
            p.start()
    for p in procs:
        p.join(timeout_s)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return outs, bufs, states, codes
