"""Serving: `AsyncEngine` feeds requests that arrive over time into one engine's step loop, and an OpenAI-compatible
HTTP app (`asyncbatch serve`) sits on top of it.

`import asyncbatch.serve` is light: the HTTP stack (fastapi, uvicorn, prometheus_client) is imported by
`asyncbatch.serve.app` and `asyncbatch.serve.server` only, and torch only when an engine is built.
"""

from __future__ import annotations

from .errors import EngineClosedError, EngineDeadError, QueueFullError
from .live import AsyncEngine, ServeObserver
from .stream import RequestStream

__all__ = ["AsyncEngine", "EngineClosedError", "EngineDeadError", "QueueFullError", "RequestStream", "ServeObserver"]
