"""How many KV-cache blocks an engine allocates (as configured, or as many as fit the device), the longest
sequence they allow, the cache tensors themselves, and what an engine holds on the device in all."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

INT32_SLOTS = 2**31 - 1  # the step tables hold KV slot indices (block * block_size + offset) as int32


def kv_cache_blocks(cache: Any, device: Any, dtype: Any, geo: dict[str, int], free: int | None) -> int:
    """Blocks for `cache` (an `engine.cache` config) of a model with geometry `geo` on `device`, with `free` bytes
    free there (None where unknown). A count that cannot fit fails here, naming its key, not inside torch."""
    per_block = 2 * geo["layers"] * cache.block_size * geo["kv_heads"] * geo["head_dim"] * dtype.itemsize
    if cache.num_blocks is not None:
        if cache.num_blocks < 2:
            raise ConfigError("engine.cache.num_blocks", "needs at least 2 (block 0 is reserved for padding)")
        key, blocks = "engine.cache.num_blocks", cache.num_blocks
    elif device.type == "cuda":  # as many as fit, within the int32 slot indices of the step tables
        return max(2, min(int(free * cache.memory_fraction) // per_block, INT32_SLOTS // cache.block_size))
    else:
        key, blocks = "engine.cache.cpu_cache_tokens", min(cache.cpu_cache_tokens // cache.block_size + 1,
                                                           INT32_SLOTS // cache.block_size)
    if free is not None and blocks * per_block > free:
        raise ConfigError(key, f"{blocks} KV blocks of {cache.block_size} tokens need "
                               f"{blocks * per_block / 2**30:.1f} GiB; {free / 2**30:.1f} GiB is free on {device}")
    return max(2, blocks)


def check_slot_buffers(num_slots: int, layout: Any, device: Any, free: int | None) -> None:
    """Refuse, naming its key, step buffers that cannot fit: each slot holds its inputs (`layout.numel` int32) and
    outputs (`max_seqs`) twice, on the host and on the device. Huge `engine.batch` budgets or an `n_slot` count in
    the millions would otherwise fail inside torch, or be killed by the OS without a word."""
    need = num_slots * 2 * (layout.numel + layout.max_seqs) * 4
    if free is not None and need > free:
        key = "engine.buffers.num_slots" if num_slots > 2 else "engine.batch"
        raise ConfigError(key, f"{num_slots} slots of step buffers for engine.batch.max_tokens={layout.max_tokens} "
                               f"and max_seqs={layout.max_seqs} need {_size(need)}; {_size(free)} is free on {device}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def max_model_len(cache: Any, geo: dict[str, int], num_blocks: int) -> int:
    """The longest sequence a run can hold: the model's context, the cache (block 0 is padding), and
    `engine.cache.max_model_len` where set."""
    limits = {"engine.model": (geo["max_positions"], "the model's context (max_position_embeddings)"),
              "engine.cache": ((num_blocks - 1) * cache.block_size, f"a KV cache of {num_blocks} blocks of "
                                                                    f"{cache.block_size}, one kept for padding")}
    if cache.max_model_len is not None:
        limits["engine.cache.max_model_len"] = (cache.max_model_len, "engine.cache.max_model_len")
    key = min(limits, key=lambda k: limits[k][0])
    longest, why = limits[key]
    if longest < 2:  # every request would fail: not one prompt token and one generated token fit
        raise ConfigError(key, f"sequences of at most {longest} tokens cannot hold a prompt token and a generated "
                               f"one (the limit comes from {why})")
    return longest


def allocate_kv(num_blocks: int, block_size: int, geo: dict[str, int], dtype: Any, device: Any) -> tuple[list, list]:
    """One zeroed K and one V tensor per layer, [num_blocks, block_size, kv_heads, head_dim] each."""
    import torch

    shape = (num_blocks, block_size, geo["kv_heads"], geo["head_dim"])
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(geo["layers"])],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geo["layers"])])


def memory_report(k_cache: Any, v_cache: Any, pipeline: Any, graphs: Any, runtime: Any) -> dict[str, int]:
    """Device bytes an engine holds, by purpose: KV cache, slot buffers (all slots, plus any staging set), and the
    shared graph pool (where the runtime can measure it)."""
    kv = sum(t.numel() * t.element_size() for t in (*k_cache, *v_cache))
    bufs = [s.device for s in pipeline.slots] + [getattr(graphs, "stage", None)]
    slots = sum(b.inputs.numel() * 4 + b.outputs.numel() * 4 for b in bufs if b is not None)
    pool = getattr(runtime, "graph_pool_bytes", None)
    return {"kv_cache": kv, "slots": slots, "graphs": pool() if pool else 0, "num_slots": pipeline.num_slots,
            "num_graphs": graphs.num_graphs()}
