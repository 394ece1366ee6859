"""Answering one generation request: submit it to the live engine, then stream server-sent events or collect a
whole response. A client that goes away cancels its request, so its KV blocks and row are freed at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..core.errors import RequestError
from .base import LiveEngine
from .errors import EngineClosedError, EngineDeadError, QueueFullError
from .protocol import ApiError, GenerationRequest, ServedModel
from .responses import DONE, ResponseWriter, sse
from .stream import RequestStream
from .text import TextAssembler


def _cancelled_by_server(stream: RequestStream) -> ApiError:
    return ApiError(503, f"the server shut down before the request completed ({stream.num_tokens} tokens "
                         "generated)", type="service_unavailable", code="shutting_down")


def _failed(exc: Exception, gen: GenerationRequest) -> ApiError:
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), type="service_unavailable", code="engine_dead")
    return ApiError(400, str(exc), param="messages" if gen.chat else "prompt")


def submit(live: LiveEngine, gen: GenerationRequest, request_id: str) -> RequestStream:
    """`live.add_request`, its refusals turned into HTTP errors (429 for a full queue)."""
    try:
        return live.add_request(gen.prompt_ids, gen.params, request_id=request_id)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full") from None
    except EngineClosedError as exc:
        raise ApiError(503, str(exc), type="service_unavailable", code="shutting_down") from None
    except (EngineDeadError, RequestError) as exc:
        raise _failed(exc, gen) from None


async def respond(request: Request, live: LiveEngine, served: ServedModel, gen: GenerationRequest) -> Response:
    writer = ResponseWriter(served.name, chat=gen.chat, include_usage=gen.include_usage)
    stream = submit(live, gen, writer.id)
    if gen.stream:
        return EventStreamResponse(_events(stream, gen, writer, served), on_close=stream.abort)
    work = asyncio.ensure_future(_collect(stream, gen, served))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client went away (or this handler was cancelled): end its request
            work.cancel()
            stream.abort()
    if not work.done() or work.cancelled():  # cancel() takes effect when the task next runs, not at once
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    try:
        text, ids, finish = work.result()
    except (RequestError, EngineDeadError) as exc:
        raise _failed(exc, gen) from None
    return JSONResponse(writer.full(text, ids, finish, len(gen.prompt_ids), _cached(stream)))


def _cached(stream: RequestStream) -> int:
    """Prompt tokens the prefix cache supplied (0 while the request's output is not in: a stop string ended it)."""
    return stream.output.num_cached_tokens if stream.output is not None else 0


async def _collect(stream: RequestStream, gen: GenerationRequest, served: ServedModel) -> tuple[str, list[int], str]:
    text = TextAssembler(served.tokenizer, gen.stop) if served.tokenizer is not None else None
    ids: list[int] = []
    parts: list[str] = []
    async for ev in stream:
        ids.append(ev.token_id)
        if text is not None:
            parts.append(text.add(ev.token_id))
            if text.stopped:
                stream.abort()
                return "".join(parts), ids, "stop"
    assert stream.output is not None
    if stream.output.finish_reason == "cancelled":
        raise _cancelled_by_server(stream)
    if text is not None:
        parts.append(text.flush())
    return "".join(parts), ids, stream.output.finish_reason


async def _events(stream: RequestStream, gen: GenerationRequest, writer: ResponseWriter,
                  served: ServedModel) -> AsyncIterator[str]:
    text = TextAssembler(served.tokenizer, gen.stop) if served.tokenizer is not None else None
    n = 0
    finish: str | None = None
    try:
        if gen.chat:
            yield sse(writer.chunk("", [], role=True))
        async for ev in stream:
            n += 1
            yield sse(writer.chunk(text.add(ev.token_id) if text is not None else "", [ev.token_id]))
            if text is not None and text.stopped:
                stream.abort()
                finish = "stop"
                break
        tail = ""
        if finish is None:
            assert stream.output is not None
            if stream.output.finish_reason == "cancelled":
                raise _cancelled_by_server(stream)
            finish = stream.output.finish_reason
            tail = text.flush() if text is not None else ""
        yield sse(writer.chunk(tail, [], finish))
        if gen.include_usage:
            yield sse(writer.usage_chunk(len(gen.prompt_ids), n, _cached(stream)))
    except ApiError as exc:  # the stream has started: the error becomes its last event
        yield sse(exc.body())
    except (RequestError, EngineDeadError) as exc:
        yield sse(_failed(exc, gen).body())
    yield DONE


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose end, however it comes (done, client gone, server cancelled), runs `on_close`."""

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], Any]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._content = content

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # a no-op for a request that ended
            try:
                await self._content.aclose()  # type: ignore[attr-defined]
            except RuntimeError:  # still running somewhere: its own cancellation closes it
                pass
