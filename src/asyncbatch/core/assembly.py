"""Building the engine's components from the registries: a family's component from its spec, the runtime for a
device, and the attention backend (`auto`: the highest-ranked one that can run here). The engine decides what to
build and composes the parts; this module only looks them up and constructs them."""

from __future__ import annotations

import logging
from typing import Any

import attrs

from .errors import UnsupportedError

log = logging.getLogger("asyncbatch")


def build(host: Any, family: str, spec: Any) -> Any:
    """The component `spec` names in `family`, with its own config (the registered default where none is given)."""
    component = host.registry(family).get(spec.name, family)
    config = spec.config if spec.config is not None else component.make_config({}, family)
    return component.factory(config)


@attrs.frozen
class PipelineParts:
    """The strategies one pipeline is composed of. `graph_name`: the graph policy that was built (`eager` where
    the runtime has no graphs, whatever was configured)."""

    scheduler: Any
    buffers: Any
    topology: Any
    graphs: Any
    graph_name: str

    def strategies(self, config: Any) -> list[tuple[str, str, Any]]:
        """(registry family, name, object) of each strategy, for `blame`."""
        return [("scheduler", config.scheduler.name, self.scheduler),
                ("buffer_policy", config.buffers.name, self.buffers),
                ("stream_topology", config.streams.name, self.topology), ("graph_policy", self.graph_name, self.graphs)]


def build_pipeline_parts(host: Any, config: Any, runtime: Any) -> PipelineParts:
    """The scheduler, buffer policy, stream topology and graph policy `config` (an `EngineConfig`) names, for
    `runtime`. Says so in the log where the runtime changes what they can do."""
    buffers = build(host, "buffer_policy", config.buffers)
    topology = build(host, "stream_topology", config.streams)
    check_topology(topology, config.streams.name)
    graph_spec = config.graphs
    if runtime.graph_support == "none" and graph_spec.name != "eager":
        log.info("runtime %r has no graphs: graph policy %r falls back to 'eager'", runtime.name, graph_spec.name)
        graph_spec = attrs.evolve(graph_spec, name="eager", config=None)
    if not runtime.is_asynchronous and (buffers.num_slots > 1 or len(topology.streams) > 1):
        log.info("runtime %r runs every op at once in program order: buffers %r and streams %r give the same "
                 "tokens but no overlap here", runtime.name, config.buffers.name, config.streams.name)
    return PipelineParts(build(host, "scheduler", config.scheduler), buffers, topology,
                         build(host, "graph_policy", graph_spec), graph_spec.name)


def check_topology(topology: Any, name: str) -> None:
    """Every role runs on a stream the topology creates (a runtime would fail on the first op otherwise, and the
    CPU and `sim` runtimes would not notice at all)."""
    from .errors import ConfigError
    from .interfaces import ROLES

    streams = tuple(topology.streams)
    for role in ROLES:
        stream = topology.stream_for(role)
        if stream not in streams:
            raise ConfigError("engine.streams", f"stream topology {name!r} runs {role} on stream {stream!r}, which "
                                                f"it does not create (its streams: {', '.join(map(repr, streams))})")


def build_runtime(host: Any, spec: Any, device: Any) -> Any:
    """The runtime `spec` names (`auto`: `cuda` on a CUDA device, else `cpu`) for `device`."""
    if spec.name == "auto":
        component = host.registry("runtime").get("cuda" if device.type == "cuda" else "cpu")
        return component.factory(component.make_config({}, "engine.runtime"), device=str(device))
    component = host.registry("runtime").get(spec.name, "engine.runtime")
    return component.factory(spec.config, device=str(device))


def choose_attention(host: Any, spec: Any, device: Any, dtype: Any, head_dim: int, block_size: int, *,
                     invariant: bool) -> tuple[Any, str]:
    """(backend, name). A named backend must run here; `auto` takes the highest `auto_priority` that does, and
    says why it skipped the others. `invariant`: the backend must also have a batch-invariant mode."""

    def ready(backend: Any) -> Any:
        if invariant:
            backend.make_batch_invariant()
        backend.check(device, dtype, head_dim, block_size)
        return backend

    if spec.name != "auto":
        return ready(build(host, "attention_backend", spec)), spec.name
    ranked = sorted((c for c in host.registry("attention_backend") if getattr(c.factory, "auto_priority", None)
                     is not None), key=lambda c: -c.factory.auto_priority)
    reasons = []
    for component in ranked:
        try:
            backend = ready(component.factory(component.make_config({}, "engine.attention")))
        except UnsupportedError as exc:
            reasons.append(f"{component.name}: {exc}")
            continue
        log.info("attention auto -> %s%s", component.name, f" (skipped: {'; '.join(reasons)})" if reasons else "")
        return backend, component.name
    raise UnsupportedError("no attention backend can run here: " + "; ".join(reasons))
