"""`asyncbatch serve` with the HTTP side in a process of its own (`engine.serve.front_end: process`).

The process the user started builds the engine and runs its step loop on the main thread (`EngineCore`); a spawned
child runs uvicorn and the app around a `RemoteEngine`, on the socket the parent bound. The two share nothing but a
pipe, so HTTP parsing, JSON, detokenising and streaming never hold the step loop's GIL.

Signals: the child leads its own process group, so a terminal's Ctrl-C reaches only the parent, which forwards
SIGINT and SIGTERM to the child once. The child then shuts down as a single-process server does (listener closed,
requests in flight given `shutdown_timeout_s`, the rest cancelled), tells the engine to close, and exits; the
parent returns when both have ended. If either side dies, the other stops too: a lost front end cancels every
request, and a lost engine makes the front end fail its streams (503) and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any

import attrs

from ..core.errors import AsyncBatchError, ConfigError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..core.engine import Engine
    from .pinning import CpuPlan
    from .protocol import ServedModel

log = logging.getLogger("asyncbatch")
JOIN_TIMEOUT_S = 30.0  # for the front end to exit once the engine has closed (its own graceful part is done)


@attrs.frozen
class FrontEndSpec:
    """What the front-end process needs, sent to it once when it starts (pickled)."""

    served: ServedModel
    ring: str  # the name of the step ring's shared memory
    intake: dict[str, Any]  # `Intake.settings()` of the engine
    max_waiting: int
    shutdown_timeout_s: float
    log_level: str
    url: str
    cpus: frozenset[int] | None = None  # where the front end may run (`engine.serve.cpu_pinning`); None: anywhere


def serve_in_two_processes(engine: Engine, sock: socket.socket, *, log_level: str) -> int:
    """Run the front-end process and serve `engine` to it until it stops; the exit code of `asyncbatch serve`."""
    import multiprocessing

    from .engine_core import EngineCore

    if os.name != "posix":  # process groups, and select() on pipes
        raise ConfigError("engine.serve.front_end", "'process' needs a POSIX system (Linux, macOS); use 'thread'")
    from .live import served_model

    ctx = multiprocessing.get_context("spawn")  # the parent holds CUDA and threads: never fork it
    ours, theirs = ctx.Pipe(duplex=True)
    host, port = sock.getsockname()[:2]
    serve_cfg = engine.config.serve
    plan = _cpu_plan(serve_cfg.cpu_pinning, str(engine.runtime.device))
    core = EngineCore(engine, ours, cpus=plan)
    try:
        spec = FrontEndSpec(served=served_model(engine), ring=core.ring.name, intake=engine.intake.settings(),
                            max_waiting=serve_cfg.max_waiting, shutdown_timeout_s=serve_cfg.shutdown_timeout_s,
                            log_level=log_level, url=f"http://{host}:{port}", cpus=plan and plan.rest)
        child = ctx.Process(target=run_front_end, args=(spec, theirs, sock), name="asyncbatch-front-end",
                            daemon=True)
        child.start()
        theirs.close()
        log.info("HTTP front end: process %d", child.pid)
        restore = _forward_signals(child.pid, lambda: core.ready)
        try:
            failure = core.serve()
        finally:
            restore()
            ours.close()
        child.join(JOIN_TIMEOUT_S)
        if child.is_alive():
            log.error("the front-end process did not exit within %.0f s of the engine stopping: killing it",
                      JOIN_TIMEOUT_S)
            child.kill()
            child.join()
    finally:
        core.ring.close(unlink=True)
    if failure is not None:
        return 1
    if child.exitcode != 0:
        raise AsyncBatchError(f"the HTTP front-end process {child.pid} exited with code {child.exitcode} (see the "
                              "log above)")
    return 0


def _cpu_plan(policy: str, device: str) -> CpuPlan | None:
    from .pinning import machine_plan

    if policy == "off":
        return None
    if device == "cpu":  # the model's own math runs on the step loop's thread pool: it needs every core
        log.warning("CPU pinning off: the model runs on the CPU, where it needs every core")
        return None
    plan = machine_plan()
    if isinstance(plan, str):
        log.warning("CPU pinning off: %s", plan)
        return None
    return plan


def _forward_signals(pid: int, serving: Any) -> Any:
    """Forward SIGINT and SIGTERM to the front end (main thread only); returns what restores the old handlers.
    Before the engine serves (building graphs can take minutes) Ctrl-C also interrupts this process, as it would
    a single-process server."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        if signum == signal.SIGINT and not serving():
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


def run_front_end(spec: FrontEndSpec, conn: Connection, sock: socket.socket) -> None:
    """The front-end process: uvicorn serving the app around a `RemoteEngine`, until a signal or a lost engine."""
    os.setpgid(0, 0)  # its own process group: a terminal's Ctrl-C goes to the engine's process, which forwards it
    if spec.cpus:  # before any thread starts: they inherit it
        os.sched_setaffinity(0, spec.cpus)
    import sys

    from ..core.intake import Intake
    from ..logs import setup_logging
    from .app import build_app
    from .listen import draining_server, uvicorn_config
    from .remote import RemoteEngine

    setup_logging(spec.log_level)
    remote = RemoteEngine(conn, ring_name=spec.ring, served=spec.served, intake=Intake(**spec.intake),
                          max_waiting=spec.max_waiting, shutdown_timeout_s=spec.shutdown_timeout_s)
    app = build_app(remote)
    app.state.url = spec.url
    server = draining_server(uvicorn_config(app, log_level=spec.log_level, quiet=False))
    remote.on_lost = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal that stopped it once it has shut down: a no-op handler makes that a clean exit.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: None)
    server.run(sockets=[sock])
    sys.exit(0 if server.started and remote._failure is None else 1)
