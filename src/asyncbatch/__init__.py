"""asyncbatch: asynchronous continuous batching of LLM inference on transformers models.

`import asyncbatch` is light: torch, CUDA and transformers are imported only when an engine is built.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "asyncbatch.core.engine",
    "RunResult": "asyncbatch.core.engine",
    "EngineConfig": "asyncbatch.core.config",
    "ExperimentConfig": "asyncbatch.core.config",
    "ComponentSpec": "asyncbatch.core.config",
    "SamplingParams": "asyncbatch.core.types",
    "Request": "asyncbatch.core.types",
    "Output": "asyncbatch.core.types",
    "TokenEvent": "asyncbatch.core.types",
    "hookimpl": "asyncbatch.core.hookspecs",
    "Scheduler": "asyncbatch.core.interfaces",
    "BufferPolicy": "asyncbatch.core.interfaces",
    "StreamTopology": "asyncbatch.core.interfaces",
    "GraphPolicy": "asyncbatch.core.interfaces",
    "AttentionBackend": "asyncbatch.core.interfaces",
    "SchedulingState": "asyncbatch.core.scheduling",
    "PendingView": "asyncbatch.core.scheduling",
    "RunContext": "asyncbatch.core.stats",
    "RaceError": "asyncbatch.core.races",
    "RaceReport": "asyncbatch.core.races",
    "PluginHost": "asyncbatch.core.plugin_host",
    "StepStats": "asyncbatch.core.stats",
    "RunSummary": "asyncbatch.core.stats",
    "AsyncBatchError": "asyncbatch.core.errors",
    "ConfigError": "asyncbatch.core.errors",
    "UnknownComponent": "asyncbatch.core.errors",
    "RequestError": "asyncbatch.core.errors",
    "UnsupportedError": "asyncbatch.core.errors",
    "PluginError": "asyncbatch.core.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncbatch' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
