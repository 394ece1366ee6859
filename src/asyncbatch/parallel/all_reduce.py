"""How a tensor-parallel group sums the partial outputs of its row-parallel layers (`engine.parallel.all_reduce`).

* `nccl`: `torch.distributed.all_reduce` (a functional collective under `torch.compile`). NCCL's ring and tree
  algorithms are built for bandwidth; a decode step's all-reduce is small (batch x hidden values, 256 KB for 32
  rows of a 4,096-wide model), and there a fixed cost per call dominates: 13 µs at 2 ranks and 16 µs at 4 on
  H100s, inside a CUDA graph. A decode step runs two per layer, 64 at 32 layers.
* `one_shot`: torch's symmetric memory. Every rank copies its partial into a buffer the others can read over
  NVLink, all wait at a barrier, each reads every partial and sums them in rank order, and a second barrier keeps
  the buffer until every peer has read it. One kernel, no ring, and every rank gets the same bits (the sum runs
  in the same order everywhere, which tensor parallelism needs: ranks sample their tokens each on its own).
  Tensors above `ONE_SHOT_MAX_BYTES` (prefill chunks) take the NCCL path, where reading every peer's whole
  buffer would cost more than a ring. It needs CUDA and peer access between the group's cards; it sums
  bfloat16 or float32 values (the kernel's types), and layers of another type take the NCCL path. Measured: 11 µs
  at 2 ranks and 14 µs at 4 for the same 256 KB.
* `lamport`: the same one-shot without barriers (`parallel.lamport`): each value is its own signal, so a call is
  one kernel that pushes this rank's partial to every peer and sums what arrives, with no round trip to wait
  for. Same conditions and same size limit as `one_shot`, plus Triton.
* `auto`: the first of `lamport` and `one_shot` whose conditions hold on every rank of the world, else `nccl`.

The choice is agreed by all ranks in `parallel.world.join`; a reducer is built per group when a layer is
sharded, before anything is compiled or captured.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import UnsupportedError

ONE_SHOT_MAX_BYTES = 1 << 20  # 1 MiB: 64 rows of an 8,192-wide bf16 model; a 2,048-token chunk takes NCCL
_ONE_SHOT_DTYPES = ("torch.bfloat16", "torch.float32")
_OP = "asyncbatch::one_shot_all_reduce"
_LAMPORT_OP = "asyncbatch::lamport_all_reduce"
_buffers: dict[str, tuple[Any, Any]] = {}  # group name -> (the group, this rank's symmetric buffer)
_lamport: dict[str, tuple[Any, dict]] = {}  # group name -> (the group, its buffer, addresses, counters, geometry)


def one_shot_unavailable(device: Any, ranks: list[int], kind: str = "one_shot") -> str | None:
    """Why this rank cannot run `kind` (`one_shot` or `lamport`) over the cards of `ranks` (local device indices),
    or None if it can. Checks only what this process can see; the world agrees on the result (`join`)."""
    import torch

    if device.type != "cuda":
        return "it needs CUDA devices"
    if kind == "lamport":
        if torch.version.hip is not None:
            return "its kernel is written for NVIDIA GPUs (it traps a dead peer with PTX)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "it needs Triton (pip install triton)"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401

        torch.ops.symm_mem.one_shot_all_reduce_copy  # noqa: B018  (raises where this torch lacks the op)
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"this torch has no symmetric-memory one-shot all-reduce ({exc})"
    me = device.index
    for peer in ranks:
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return f"cuda:{me} cannot access cuda:{peer} directly (no peer-to-peer link)"
    return None


def _register(op: str, impl: Any) -> None:
    """Register `impl(y, group_name) -> sum` as the custom op `op`, once per process.

    An opaque op to torch.compile: inductor must neither move the symmetric buffer nor copy it into memory of its
    own, and a custom op keeps the layer in one compiled graph (no graph break around the collective). The schema
    is spelled out: this module's postponed annotations are strings the op's inference cannot read."""
    import torch

    if hasattr(torch.ops.asyncbatch, op.split("::")[1]):
        return
    custom = torch.library.custom_op(op, impl, mutates_args=(), schema="(Tensor y, str group_name) -> Tensor")
    custom.register_fake(lambda y, group_name: torch.empty_like(y))


def _one_shot(y: Any, group_name: str) -> Any:
    import torch

    flat = _buffers[group_name][1][: y.numel()].view(y.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(flat, y.contiguous(), "sum", group_name)


def _lamport_sum(y: Any, group_name: str) -> Any:
    from . import lamport

    held = _lamport[group_name][1]
    return lamport.all_reduce(y.contiguous(), held["table"], held["state"], rank=held["rank"], world=held["world"],
                              cap=held["cap"])


def _register_op() -> None:
    _register(_OP, _one_shot)


def _register_lamport_op() -> None:
    _register(_LAMPORT_OP, _lamport_sum)


class Reducer:
    """Sums a row-parallel layer's partial output over `group`. Called by `RowParallelLinear.forward`, eagerly or
    while torch.compile traces; it must give every rank of the group identical results."""

    def __init__(self, group: Any, kind: str, dtype: Any, device: Any) -> None:
        self.group = group
        self.one_shot_numel = 0
        self.lamport_numel = 0
        if kind == "one_shot" and str(dtype) in _ONE_SHOT_DTYPES:
            self._setup_one_shot(dtype, device)
        if kind == "lamport" and str(dtype) in _ONE_SHOT_DTYPES:
            self._setup_lamport(dtype, device)

    def _setup_lamport(self, dtype: Any, device: Any) -> None:
        import torch
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from . import lamport

        name = self.group.group_name
        if _lamport.get(name, (None,))[0] is not self.group:
            world, cap = dist.get_world_size(self.group), ONE_SHOT_MAX_BYTES // torch.empty((), dtype=dtype).element_size()
            buf = symm_mem.empty(lamport.SLOTS * world * cap, dtype=lamport.bits_dtype(dtype), device=device)
            buf.fill_(lamport.sentinel(dtype))
            handle = symm_mem.rendezvous(buf, name)  # collective over the group, like `_setup_one_shot`
            torch.cuda.synchronize(device)
            dist.barrier(group=self.group)  # every rank's buffer holds the sentinel before any peer pushes into it
            _lamport[name] = (self.group, {
                "dtype": str(dtype), "buffer": buf, "world": world, "cap": cap, "rank": dist.get_rank(self.group),
                "table": torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device),
                "state": torch.zeros(lamport.STATE_INTS, dtype=torch.int32, device=device)})
        held = _lamport[name][1]
        if held["dtype"] != str(dtype):
            raise UnsupportedError(f"engine.parallel.all_reduce=lamport: one group cannot serve both "
                                   f"{held['dtype']} and {dtype} layers")
        _register_lamport_op()
        self.lamport_numel = held["cap"]

    def _setup_one_shot(self, dtype: Any, device: Any) -> None:
        import torch
        import torch.distributed._symmetric_memory as symm_mem

        name = self.group.group_name
        if _buffers.get(name, (None,))[0] is not self.group:  # a name can come back in a new world
            numel = ONE_SHOT_MAX_BYTES // torch.empty((), dtype=dtype).element_size()
            buf = symm_mem.empty(numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, name)  # collective over the group: every rank shards its layers in step
            _buffers[name] = (self.group, buf)
        buf = _buffers[name][1]
        if buf.dtype != dtype:
            raise UnsupportedError(f"engine.parallel.all_reduce=one_shot: one group cannot serve both "
                                   f"{buf.dtype} and {dtype} layers")
        _register_op()
        self.one_shot_numel = buf.numel()

    def __call__(self, y: Any) -> Any:
        import torch

        if 0 < y.numel() <= self.lamport_numel:
            return torch.ops.asyncbatch.lamport_all_reduce(y, self.group.group_name)
        if 0 < y.numel() <= self.one_shot_numel:
            return torch.ops.asyncbatch.one_shot_all_reduce(y, self.group.group_name)
        if torch.compiler.is_compiling():
            import torch.distributed._functional_collectives as funcol

            return funcol.all_reduce(y, "sum", self.group)
        import torch.distributed as dist

        dist.all_reduce(y, group=self.group)
        return y

