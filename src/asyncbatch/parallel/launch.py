"""Start the ranks of a data-parallel `asyncbatch run` and watch them.

The command is run once per rank, with the environment `torchrun` would give it. Rank 0 keeps this terminal;
the other ranks write to `rank<N>.log` in the log directory, where `pids.json` maps ranks to process ids. When
a rank exits with an error or is killed, the others are stopped and the run fails with a message naming that
rank and what ended it, followed by the end of its log. A dead rank never leaves the run hanging (the
survivors' collectives also time out, see `world`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

POLL_S = 0.1
SETTLE_S = 1.0
GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def blame_order(rank_code: tuple[int, int]) -> tuple[bool, bool, int]:
    """Sort key of failed ranks, the likeliest cause first: a rank killed from outside (SIGKILL, SIGTERM, ...),
    then one that aborted (SIGABRT: also how a rank whose peer died ends, when its collective library gives up),
    then ranks that exited with an error code, which mostly report a lost peer; by rank within each."""
    rank, code = rank_code
    return code >= 0, code == -signal.SIGABRT, rank


class Terminated(SystemExit):
    """The launcher got SIGTERM (exit status 143, as a shell reports it)."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


def launch(command: Sequence[str], nproc: int, *, log_dir: Path | None = None) -> int:
    """Run `command` as ranks 0..nproc-1 of one world; 0 when every rank succeeds, else 1 (after stopping the
    others and printing which rank failed and how)."""
    logs = Path(log_dir or tempfile.mkdtemp(prefix="asyncbatch-ranks-"))
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen] = []
    files = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if rank == 0:
            procs.append(subprocess.Popen(list(command), env=env))
            continue
        f = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below, after the process ends)
        files.append(f)
        procs.append(subprocess.Popen(list(command), env=env, stdout=f, stderr=subprocess.STDOUT))
    # Which process is which rank, for whoever needs to look at (or signal) one of them.
    (logs / "pids.json").write_text(json.dumps({str(rank): p.pid for rank, p in enumerate(procs)}))
    # A launcher stopped by a signal stops its ranks first: an orphaned rank would hold its GPU and its peers.
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        failed = _watch(procs)
    except (KeyboardInterrupt, Terminated):
        _stop(procs)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
        for f in files:
            f.close()
    if failed is None:
        return 0
    ended, running = failed
    ended.sort(key=blame_order)
    rank, code = ended[0]
    others = [f"rank {r} {describe_exit(c)}" for r, c in ended[1:]]
    others += [f"rank {r} was still running (stopped or hung?)" for r in running]
    print(f"asyncbatch: rank {rank} of {nproc} {describe_exit(code)}" + (f" ({'; '.join(others)})" if others else "")
          + "; the other ranks were stopped", file=sys.stderr)
    log = logs / f"rank{rank}.log"
    if rank > 0 and log.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        if tail:
            print(f"asyncbatch: last lines of rank {rank} ({log}):", file=sys.stderr)
            print("\n".join("  " + line for line in tail), file=sys.stderr)
    return 1


def _watch(procs: list[subprocess.Popen]) -> tuple[list[tuple[int, int]], list[int]] | None:
    """Wait for every rank. On the first failure give the others a moment to fail too (a peer's death reaches
    them as a collective error), stop the rest, and return every (rank, exit code) that failed and the ranks
    that were still running."""
    while True:
        codes = [p.poll() for p in procs]
        if any(code not in (None, 0) for code in codes):
            deadline = time.monotonic() + SETTLE_S
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(POLL_S)
            codes = [p.poll() for p in procs]
            _stop(procs)
            return ([(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)],
                    [rank for rank, code in enumerate(codes) if code is None])
        if all(code == 0 for code in codes):
            return None
        time.sleep(POLL_S)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
