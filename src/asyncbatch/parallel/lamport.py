"""A barrier-free one-shot all-reduce for the decode step's small tensors (`engine.parallel.all_reduce: lamport`).

torch's symmetric-memory one-shot (`one_shot`) meets its peers at two barriers per call, a round trip over NVLink
each. Here a value is its own signal (Lamport's idea, as in TensorRT-LLM's custom all-reduce):

* Every rank owns a buffer of three slots; a slot holds one section per rank. All of it starts at a sentinel bit
  pattern, negative zero, which no partial carries: a writer turns -0.0 into +0.0 first (the sum is unchanged).
* A call pushes this rank's partial into its section of the current slot on every rank (NVLink stores), then
  polls its own slot until no element of any section is the sentinel, and sums the sections in rank order in
  float32. Every rank adds the same values in the same order, so every rank gets the same bits.
* It then puts the sentinel back into the slot it used one call earlier. Three slots make that safe: a peer can
  run at most one call ahead (it cannot finish a call without this rank's partial), so it writes the slot after
  this one, never the one being cleared, and the slot it will write two calls on was cleared the call before.
* Which slot is current lives on the device (`state`), so a call captured in a CUDA graph picks the right slot at
  each replay. The last program of a call advances it. Every rank makes the same calls in the same order (tensor
  parallelism runs the same batches in lockstep), so the ranks' counters agree without talking.

A peer that never writes would keep a rank polling forever; after `MAX_POLLS` polls the kernel traps, so the
process fails with a CUDA error instead of hanging (and the run's collective timeouts name the dead rank).
Buffers and counters are built by `parallel.all_reduce.Reducer`; this module only needs their pointers, so it
runs under Triton's interpreter with CPU buffers shared between processes (the tests).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

SLOTS = 3
STATE_INTS = 8  # [0] the current slot, [1] programs finished in this call, [2 + slot] elements it last held, [6] timed out
MAX_POLLS = 1 << 30  # polls of one block before giving up on a peer: about a quarter of an hour on a GPU, longer
# than any start-up skew between ranks (each compiles its own layers before its first real call)
_MIN_BLOCK = 256
_MAX_PROGRAMS = 1024  # few enough that every program of a call is resident at once (a waiting one holds its SM)
_WARPS = 4


@triton.jit
def _lamport_all_reduce(x_ptr, out_ptr, table_ptr, state_ptr, numel, cap, rank: tl.constexpr,
                        world: tl.constexpr, BITS: tl.constexpr, VALUE: tl.constexpr, SENTINEL: tl.constexpr,
                        MAX_POLL: tl.constexpr, TRAP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cur = tl.load(state_ptr, volatile=True)  # the slot itself, not a call count: a count would overflow in days
    prev = (cur + 2) % 3
    mine = tl.load(table_ptr + rank).to(tl.pointer_type(BITS))
    slot = cap * world  # elements in a slot
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel

    bits = tl.load(x_ptr + offs, mask=mask).to(BITS, bitcast=True)
    bits = tl.where(bits == SENTINEL, tl.zeros_like(bits), bits)  # -0.0 -> +0.0: the sentinel must never be a value
    for peer in tl.static_range(world):
        base = tl.load(table_ptr + peer).to(tl.pointer_type(BITS))
        tl.store(base + cur * slot + rank * cap + offs, bits, mask=mask)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    polls = 0
    for r in tl.static_range(world):
        src = mine + cur * slot + r * cap + offs
        got = tl.load(src, mask=mask, other=0, volatile=True)
        while (tl.max((got == SENTINEL).to(tl.int32), axis=0) > 0) & (polls < MAX_POLL):
            got = tl.load(src, mask=mask, other=0, volatile=True)
            polls += 1
        acc += got.to(VALUE, bitcast=True).to(tl.float32)
    if polls >= MAX_POLL:
        tl.store(state_ptr + 6, 1)
        if TRAP:
            tl.inline_asm_elementwise("trap;\n mov.b32 $0, $1;", "=r,r", [got.to(tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)
    tl.store(out_ptr + offs, acc.to(VALUE), mask=mask)

    held = tl.load(state_ptr + 2 + prev)  # what the previous call pushed: clear that much, whatever this call's size
    for start in range(pid * BLOCK, held, nprog * BLOCK):
        at = start + tl.arange(0, BLOCK)
        for r in tl.static_range(world):
            tl.store(mine + prev * slot + r * cap + at, tl.full([BLOCK], SENTINEL, BITS), mask=at < held)
    if pid == 0:
        tl.store(state_ptr + 2 + cur, numel)
    if tl.atomic_add(state_ptr + 1, 1) == nprog - 1:  # the last program of this call moves every rank's slot on
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, (cur + 1) % 3)


_KINDS = {"torch.bfloat16": (tl.int16, tl.bfloat16, -(1 << 15)), "torch.float32": (tl.int32, tl.float32, -(1 << 31))}


def bits_dtype(dtype: Any) -> Any:
    """The integer dtype a buffer of `dtype` values is stored as (its sentinel is that type's minimum)."""
    import torch

    return {"torch.bfloat16": torch.int16, "torch.float32": torch.int32}[str(dtype)]


def sentinel(dtype: Any) -> int:
    return _KINDS[str(dtype)][2]


def all_reduce(x: Any, table: Any, state: Any, *, rank: int, world: int, cap: int, trap: bool = True) -> Any:
    """The sum over the group of `x` (contiguous, at most `cap` elements), the same bits on every rank.

    `table`: a device tensor of `world` int64 addresses, each rank's buffer of `SLOTS * world * cap` elements of
    `bits_dtype(x.dtype)`, all set to `sentinel` before the first call; `state`: this rank's `STATE_INTS` int32
    zeros. Every rank of the group must make the same calls with the same sizes, in the same order."""
    import torch

    bits, value, mark = _KINDS[str(x.dtype)]
    out = torch.empty_like(x)
    numel = x.numel()
    # Many small programs: the pushes to peers go out from every SM at once. Measured on 4 x H100 at 512 KiB:
    # 9.7 µs with 256-element blocks, 11.1 with 1,024, 11.4 with 2,048.
    block = max(_MIN_BLOCK, triton.next_power_of_2(triton.cdiv(numel, _MAX_PROGRAMS)))
    _lamport_all_reduce[(triton.cdiv(numel, block),)](
        x, out, table, state, numel, cap, rank=rank, world=world, BITS=bits, VALUE=value,
        SENTINEL=mark, MAX_POLL=MAX_POLLS if trap else 1 << 12, TRAP=trap, BLOCK=block, num_warps=_WARPS)
    return out
