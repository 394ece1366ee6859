"""The OpenAI-compatible HTTP app around one `AsyncEngine` (FastAPI).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events or whole),
`GET /v1/models` (and `/v1/models/{id}`), `GET /health`, `GET /metrics` (Prometheus). Every error, ours or the framework's (unknown route,
wrong method), is an OpenAI error object. The app's lifespan starts the live engine and shuts it down gracefully.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import attrs
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .base import LiveEngine
from .generate import respond
from .metrics import ServeMetrics
from .protocol import ApiError, parse_chat, parse_completion, served_model_name

__all__ = ["build_app", "served_model_name"]

log = logging.getLogger("asyncbatch")


def build_app(live: LiveEngine, *, model_name: str | None = None) -> FastAPI:
    """The app serving `live`, an `AsyncEngine` or a `RemoteEngine` (not started: the app's lifespan starts it, and
    shuts it down with `engine.serve.shutdown_timeout_s`). Adds its metrics to the live engine's observers.
    `model_name` replaces the name the engine's config gives."""
    served = live.served if model_name is None else attrs.evolve(live.served, name=model_name)
    metrics = ServeMetrics(live)
    live.add_observer(metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await live.start()
        url = getattr(app.state, "url", None)
        log.info("ready: serving %r%s (max_len %d, %s); Ctrl-C or SIGTERM stops it gracefully", served.name,
                 f" on {url}" if url else "", served.max_len, "with its tokenizer" if served.tokenizer is not None
                 else "no tokenizer: prompts are token ids, no chat")
        try:
            yield
        finally:
            await live.shutdown()

    app = FastAPI(title="asyncbatch", lifespan=lifespan)
    app.state.live = live
    app.state.metrics = metrics
    app.state.served = served

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", type=kind).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        body = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, live, served, parse_completion(await request.body(), served))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await respond(request, live, served, parse_chat(await request.body(), served))

    card = {"id": served.name, "object": "model", "created": created, "owned_by": "asyncbatch",
            "max_model_len": served.max_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # `path`: model names may hold slashes (org/name)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != served.name:
            raise ApiError(404, f"The model {model_id!r} does not exist: this server serves {served.name!r}",
                           param="model", code="model_not_found")
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        if live.accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
