"""The listening socket and uvicorn's settings, shared by the single-process server and the front-end process."""

from __future__ import annotations

import math
import socket
from typing import Any

from ..core.errors import AsyncBatchError, ConfigError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not listening yet; `AsyncBatchError` naming the address if it can't be."""
    if not 0 <= port <= 65535:
        raise ConfigError("--port", f"must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise AsyncBatchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, *, log_level: str, timeout_s: float, quiet: bool) -> Any:
    """`quiet`: uvicorn's own loggers are left unconfigured and there is no access log (a server inside a test);
    otherwise uvicorn logs as it does on its own command line."""
    import uvicorn

    extra: dict[str, Any] = {"log_config": None, "access_log": False} if quiet else {}
    return uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=math.ceil(timeout_s),
                          **extra)
