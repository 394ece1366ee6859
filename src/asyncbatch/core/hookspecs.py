"""The public plugin contract of asyncbatch.

A plugin is a module or object with functions marked `@asyncbatch.hookimpl` whose names match the specs below.
Third-party packages expose one through the entry-point group ``asyncbatch`` in their `pyproject.toml`:

```toml
[project.entry-points.asyncbatch]
my_plugin = "my_package.plugin"
```

Registration hooks receive a `register(name, factory, *, config=None, description="")` callback. `factory` is
called as ``factory(config, **runtime_objects)``; `config` defaults to ``factory.Config`` and must be an attrs
class: YAML parameters of the component are structured into it and validated before anything is built.
Built-in components are registered through these same hooks (`asyncbatch.plugins.builtin`).

Lifecycle hooks are observers. They are called on the host thread between steps; one that raises is reported
(naming the plugin) and never loses a request's output. They must not block for long: the GPU may be waiting.
An implementation may take any subset of its spec's arguments (pluggy's rule): a plugin written against
``asyncbatch_run_finished(summary)`` keeps working now that the spec also passes ``context``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("asyncbatch")
hookimpl = pluggy.HookimplMarker("asyncbatch")


@hookspec
def asyncbatch_register_schedulers(register: Any) -> None:
    """Register `Scheduler` implementations (family ``scheduler``)."""


@hookspec
def asyncbatch_register_buffer_policies(register: Any) -> None:
    """Register `BufferPolicy` implementations (family ``buffer_policy``)."""


@hookspec
def asyncbatch_register_stream_topologies(register: Any) -> None:
    """Register `StreamTopology` implementations (family ``stream_topology``)."""


@hookspec
def asyncbatch_register_graph_policies(register: Any) -> None:
    """Register `GraphPolicy` implementations (family ``graph_policy``)."""


@hookspec
def asyncbatch_register_attention_backends(register: Any) -> None:
    """Register `AttentionBackend` implementations (family ``attention_backend``)."""


@hookspec
def asyncbatch_register_prefix_caches(register: Any) -> None:
    """Register `PrefixCache` implementations (family ``prefix_cache``)."""


@hookspec
def asyncbatch_register_runtimes(register: Any) -> None:
    """Register `Runtime` implementations (family ``runtime``)."""


@hookspec
def asyncbatch_register_model_presets(register: Any) -> None:
    """Register model presets (family ``model_preset``): ``factory(config) -> transformers PretrainedConfig``."""


@hookspec
def asyncbatch_register_workloads(register: Any) -> None:
    """Register workload generators (family ``workload``): ``factory(config, vocab_size=..., seed=...)`` returns
    an object whose ``requests()`` yields `Request` values."""


@hookspec
def asyncbatch_run_started(context: Any) -> None:
    """A `run` call is about to start its clock (after start-up and warm-up). `context` is a `RunContext` (frozen):
    the config as a dict, the sweep cell and its assignment, the repetition, the output directory (None outside an
    experiment) and the number of requests."""


@hookspec
def asyncbatch_step_finished(stats: Any) -> None:
    """A batch was updated on the host. `stats` is a `StepStats` (frozen): batch index, tokens, timings."""


@hookspec
def asyncbatch_request_finished(output: Any) -> None:
    """A request ended (any finish reason). `output` is its final `Output`."""


@hookspec
def asyncbatch_run_finished(summary: Any, context: Any) -> None:
    """A `generate`/`run` call ended. `summary` is a `RunSummary` (frozen) with throughput and latency figures;
    `context` is the `RunContext` that `asyncbatch_run_started` got. The `hook_errors` of `summary` counts the
    run's hook failures up to this call; the summary of the run's result (and its results.json) also counts the
    `asyncbatch_run_finished` implementations that raise here."""
