"""What the live engine refuses, and why. The HTTP app maps each to a status: 429 for a full queue, 503 for an
engine that is not serving; invalid requests are `asyncbatch.RequestError` (400)."""

from __future__ import annotations

from ..core.errors import AsyncBatchError


class QueueFullError(AsyncBatchError):
    """`engine.serve.max_waiting` requests already wait for a row: retry later."""


class EngineClosedError(AsyncBatchError):
    """The live engine is not taking requests: not started yet, or shutting down."""


class EngineDeadError(AsyncBatchError):
    """The step loop stopped on an error; every request still open fails with this, naming the cause."""
