"""Running the app on uvicorn: `asyncbatch serve` (the foreground server), and `BackgroundServer` (a server in a
thread on a free local port, for tests and load generators).

The socket is bound before the model is built, so a port already in use fails at once; clients are accepted once
the engine serves. SIGINT and SIGTERM shut down gracefully: the listener closes, requests in flight finish within
`engine.serve.shutdown_timeout_s` (later ones are cancelled), then the step loop stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..core.errors import AsyncBatchError, ConfigError
from .listen import bind, draining_server, uvicorn_config

__all__ = ["BackgroundServer", "bind", "serve"]

log = logging.getLogger("asyncbatch")


def serve(config_path: str, *, host: str, port: int, overrides: Sequence[str] = (), log_level: str = "info") -> int:
    """`asyncbatch serve CONFIG`: the `engine` section of an experiment file, served until SIGINT/SIGTERM."""
    try:  # dependencies of the package; an environment that left them out is told what is missing
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise AsyncBatchError(f"asyncbatch serve needs fastapi, uvicorn and prometheus_client: {exc} (pip install "
                              f"fastapi uvicorn prometheus_client, or reinstall asyncbatch)") from None

    from ..core.config import ExperimentConfig
    from ..core.engine import Engine
    from .app import build_app
    from .live import AsyncEngine

    config = ExperimentConfig.from_yaml(config_path, overrides=list(overrides)).engine
    if config.parallel.data * config.parallel.tensor > 1:
        raise ConfigError("engine.parallel", "serving runs one engine in one process: set data and tensor to 1")
    if config.serve.cpu_pinning != "off" and config.serve.front_end != "process":
        raise ConfigError("engine.serve.cpu_pinning", "pinning keeps a front-end process off the step loop's core: "
                                                      "it needs engine.serve.front_end: process", ["off"])
    sock = bind(host, port)
    try:
        engine = Engine.from_config(config)
        if config.serve.front_end == "process":
            from .front_end import serve_in_two_processes

            return serve_in_two_processes(engine, sock, log_level=log_level)
        app = build_app(AsyncEngine(engine))
        address = sock.getsockname()
        app.state.url = f"http://{address[0]}:{address[1]}"  # the ready line names it (a port of 0 was chosen now)
        server = draining_server(uvicorn_config(app, log_level=log_level, quiet=False))
        # uvicorn re-raises the signal that stopped it once it has shut down; a graceful SIGTERM exits 0.
        previous = signal.signal(signal.SIGTERM, lambda *_: None) if _main_thread() else None
        try:
            server.run(sockets=[sock])
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if not server.started:
            raise AsyncBatchError("the server did not start (see the log above)")
        return 0
    finally:
        sock.close()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class BackgroundServer:
    """uvicorn serving `app` in a thread of this process, on 127.0.0.1 and a free port: `with BackgroundServer(app)
    as srv: httpx.get(srv.url + "/health")`. Leaving the block shuts the server down gracefully (`stop()`)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout_s: float = 60.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.server: Any = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.server = draining_server(uvicorn_config(self.app, log_level=self.log_level, quiet=True))

        def run() -> None:
            try:
                self.server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001  (uvicorn exits through SystemExit on a failed start)
                self._failure = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise AsyncBatchError(f"the server on {self.url} did not start: {self._failure!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: no new connections, requests in flight finish, the live engine shuts down."""
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
