"""The process group of a data-parallel run: who this process is, and the few collectives it needs.

Ranks find each other through the environment `torchrun` (and `asyncbatch run` with `engine.parallel.data > 1`)
sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Replicas exchange only Python objects (outputs and
summaries), so the group is gloo on every device; each collective fails after `timeout_s` instead of hanging
when another rank has died or stopped.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import attrs

from ..core.errors import ConfigError


@attrs.frozen
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

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

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def env_world() -> World:
    """This process's place in a launched world, from the environment (a world of one when none is set)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def join(replicas: int, timeout_s: float, device: str) -> World:
    """Join the launched world for a run with `replicas` data-parallel replicas (`engine.parallel.data`).

    Outside a launched world, with one replica, this is a world of one. Inside one, its size must be the
    configured replica count. On CUDA each rank takes the device of its local rank."""
    world = env_world()
    if world.size != replicas:
        where = "this process is not part of a launched world" if world.size == 1 else \
            f"the launched world has {world.size} ranks"
        raise ConfigError("engine.parallel.data", f"{replicas} replicas configured but {where} (start it with "
                                                  f"`asyncbatch run --nproc {replicas}` or torchrun)")
    if world.size == 1:
        return world
    import torch
    import torch.distributed as dist

    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=timeout_s))
    return world
