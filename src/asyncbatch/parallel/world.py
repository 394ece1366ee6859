"""The process group of a data-parallel run: who this process is, and the few collectives it needs.

Ranks find each other through the environment `torchrun` (and `asyncbatch run` with several ranks) sets: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Replicas exchange only Python objects (outputs, summaries),
over gloo on every device; tensor-parallel layers reduce activations in their own group. Each collective fails
after `timeout_s` instead of hanging when another rank has died or stopped.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import attrs

from ..core.errors import ConfigError, UnsupportedError

log = logging.getLogger("asyncbatch")

# Set once this process holds an NCCL group. Its communicators are baked into the CUDA graphs the engine captured,
# and destroying them while those graphs may live hangs (observed with torch 2.11 on H100s); the process ends
# without tearing them down instead (`asyncbatch.cli.main` exits at once; the driver releases them).
_nccl_in_graphs = False


def exit_skips_teardown() -> bool:
    """True when this process must end without destroying its process groups (see `_nccl_in_graphs`)."""
    return _nccl_in_graphs


@attrs.frozen
class World:
    """This process's place: `rank` of `size`; `data` replicas of `tensor` ranks each, a replica's ranks
    consecutive (`rank = replica * tensor + tp_rank`, so a tensor-parallel group sits on neighbouring cards).
    `tp_group` is the process group its tensor-parallel layers reduce over (None without tensor parallelism)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    data: int = 1
    tensor: int = 1
    tp_group: Any = None
    all_reduce: str = "nccl"  # how `tp_group` sums (`parallel.all_reduce`), agreed by every rank in `join`
    shard_lm_head: bool = False  # `parallel.shard_lm_head`: the output head split by vocabulary (`parallel.vocab`)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def replica(self) -> int:
        return self.rank // self.tensor

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size if self.is_root else None
        dist.gather_object(obj, out, dst=0)
        return out

    def min(self, value: int) -> int:
        """The smallest `value` over all ranks (every rank gets it)."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized() and not _nccl_in_graphs:
                dist.destroy_process_group()


def env_world() -> World:
    """This process's place in a launched world, from the environment (a world of one when none is set)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def join(data: int, tensor: int, timeout_s: float, device: str, all_reduce: str = "auto", *,
         shard_lm_head: bool = False) -> World:
    """Join the launched world of a run with `data` replicas of `tensor` ranks each (`engine.parallel`); both
    may be above 1 (data parallelism over tensor-parallel groups).

    Outside a launched world, with one rank, this is a world of one. Inside one, its size must be
    `data * tensor`. On CUDA each rank takes the device of its local rank. Objects (outputs, summaries) travel
    over gloo; tensor-parallel layers reduce over NCCL on CUDA and gloo on the CPU."""
    found = env_world()
    want = data * tensor
    if found.size != want:
        where = "this process is not part of a launched world" if found.size == 1 else \
            f"the launched world has {found.size} ranks"
        key = "engine.parallel.data" if tensor == 1 else "engine.parallel.tensor"
        raise ConfigError(key, f"{want} ranks configured (data {data} x tensor {tensor}) but {where} (start it "
                               f"with `asyncbatch run` or torchrun with {want} processes)")
    if want == 1:
        return found
    import torch
    import torch.distributed as dist

    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(found.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=found.rank, world_size=found.size,
                                timeout=timedelta(seconds=timeout_s))
    group = None
    if tensor > 1:
        for replica in range(data):  # every rank creates every group, in the same order (torch.distributed's rule)
            ranks = list(range(replica * tensor, (replica + 1) * tensor))
            made = dist.new_group(ranks, backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
            if found.rank in ranks:
                group = made
        if cuda:
            global _nccl_in_graphs
            _nccl_in_graphs = True
            # NCCL sets up its communicator on a group's first collective; that must not be inside a graph capture.
            probe = torch.ones(1, device="cuda")
            dist.all_reduce(probe, group=group)
            torch.cuda.synchronize()
    kind = _agree_all_reduce(found, all_reduce, cuda, tensor) if tensor > 1 else "nccl"
    return attrs.evolve(found, data=data, tensor=tensor, tp_group=group, all_reduce=kind,
                        shard_lm_head=shard_lm_head and tensor > 1)


def _agree_all_reduce(found: World, wanted: str, cuda: bool, tensor: int) -> str:
    """`lamport`, `one_shot` or `nccl`, the same on every rank. `auto` takes the first of `lamport`, `one_shot` and
    `nccl` that every rank can run (a rank that cannot run one turns it off for all); an explicit choice that some
    rank cannot run fails the run with that rank's reason."""
    if wanted == "nccl":
        log.info("parallel: tensor-parallel all-reduce: nccl")
        return "nccl"
    import torch

    from .all_reduce import one_shot_unavailable

    why = "it needs CUDA devices"
    for kind in ("lamport", "one_shot") if wanted == "auto" else (wanted,):
        if cuda:
            count = torch.cuda.device_count()
            first = found.rank // tensor * tensor
            why = one_shot_unavailable(torch.device("cuda", torch.cuda.current_device()),
                                       [r % count for r in range(first, first + tensor)], kind)
        if found.min(0 if why else 1):
            log.info("parallel: tensor-parallel all-reduce: %s (symmetric memory)", kind)
            return kind
        why = why or "another rank cannot run it"
    if wanted != "auto":
        raise UnsupportedError(f"engine.parallel.all_reduce={wanted}: {why} (use auto or nccl)")
    log.info("parallel: tensor-parallel all-reduce: nccl (%s)", why)
    return "nccl"
