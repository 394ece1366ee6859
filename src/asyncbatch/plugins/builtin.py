"""Registers every built-in component through the same hooks third-party plugins use."""

from __future__ import annotations

from typing import Any

import attrs

from ..core.hookspecs import hookimpl


@attrs.frozen
class AutoConfig:
    """`auto` is resolved by the engine: the runtime matching the model's device; the highest-ranked attention
    backend that can run here (the choice is logged)."""


class Auto:
    """Resolved by the engine at build time (see AutoConfig)."""

    Config = AutoConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("'auto' is resolved by the engine; it is never built directly")


@hookimpl
def asyncbatch_register_schedulers(register: Any) -> None:
    from ..strategies import cache_aware as c
    from ..strategies import schedulers as s

    register("fifo", s.Fifo)
    register("prefill_first", s.PrefillFirst)
    register("shortest_first", s.ShortestFirst)
    register("priority", s.Priority)
    register("stop_aware", s.StopAware)
    register("longest_prefix_first", c.LongestPrefixFirst)
    register("fair_prefix", c.FairPrefix)


@hookimpl
def asyncbatch_register_buffer_policies(register: Any) -> None:
    from ..strategies import buffers as b

    register("single", b.Single)
    register("double", b.Double)
    register("n_slot", b.NSlot)


@hookimpl
def asyncbatch_register_stream_topologies(register: Any) -> None:
    from ..strategies import streams as s

    register("one", s.One)
    register("two", s.Two)
    register("three", s.Three)


@hookimpl
def asyncbatch_register_graph_policies(register: Any) -> None:
    from ..strategies import graphs as g

    register("eager", g.Eager)
    register("per_slot", g.PerSlot)
    register("staged", g.Staged)
    register("mixed", g.Mixed)


@hookimpl
def asyncbatch_register_attention_backends(register: Any) -> None:
    from ..strategies.attention import flash, sdpa, triton_paged

    register("auto", Auto, description="the fastest backend that can run here (logged)")
    register("sdpa", sdpa.Sdpa)
    register("triton", triton_paged.TritonPaged)
    register("flash", flash.Flash)


@hookimpl
def asyncbatch_register_prefix_caches(register: Any) -> None:
    from ..strategies import prefix_cache as p

    register("none", p.NoPrefixCache)
    register("blocks", p.HashedBlocks)
    register("radix", p.RadixTree)


@hookimpl
def asyncbatch_register_runtimes(register: Any) -> None:
    from ..core.runtime import cpu, cuda, sim

    register("auto", Auto, description="cuda when the model is on a GPU, else cpu")
    register("cpu", cpu.CpuRuntime)
    register("cuda", cuda.CudaRuntime)
    register("sim", sim.SimRuntime)


@hookimpl
def asyncbatch_register_model_presets(register: Any) -> None:
    from . import presets

    for name, factory in presets.PRESETS.items():
        register(name, factory, config=presets.PresetConfig)


@hookimpl
def asyncbatch_register_workloads(register: Any) -> None:
    from . import prefix_workloads, workloads

    register("synthetic", workloads.Synthetic)
    register("jsonl", workloads.JsonlPrompts)
    register("shared_prefix", prefix_workloads.SharedPrefix)
    register("conversation", prefix_workloads.Conversation)
