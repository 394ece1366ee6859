"""The listening socket and uvicorn's settings, shared by the single-process server and the front-end process."""

from __future__ import annotations

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


FLUSH_S = 5  # after the engine has drained, how long uvicorn gives handlers to write their last events


def uvicorn_config(app: Any, *, log_level: str, quiet: bool) -> Any:
    """`quiet`: uvicorn's own loggers are left unconfigured and there is no access log (a server inside a test);
    otherwise uvicorn logs as it does on its own command line."""
    import uvicorn

    extra: dict[str, Any] = {"log_config": None, "access_log": False} if quiet else {}
    return uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=FLUSH_S, **extra)


def draining_server(config: Any) -> Any:
    """uvicorn's server for `config`, whose app serves `app.state.live` (a `LiveEngine`), stopping in the order the
    serving docs promise: the listener closes, requests in flight get `engine.serve.shutdown_timeout_s` to finish
    and the rest are cancelled, each stream ending with its last event, and only then does uvicorn wait for the
    connections to close. uvicorn alone waits for its connections first, with its own budget, and then cancels
    the handlers mid-stream (a client reads a truncated body); the app's lifespan, where the engine used to drain,
    runs only after that."""
    import uvicorn

    live = config.app.state.live

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:
                server.close()
            if not self.force_exit:  # a second Ctrl-C skips the wait
                await live.drain()
            await super().shutdown(sockets)

    return DrainingServer(config)
