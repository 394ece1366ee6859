"""`asyncbatch serve` as users start it, in a subprocess: `with ServeProcess(config) as srv: httpx.get(srv.url)`.

It waits for the ready line, reads the front end's process id from the log (`engine.serve.front_end: process`), and
on leaving sends SIGTERM and waits for the exit code (`srv.code`); a server that hangs is killed, never waited on
for ever. The whole log is in `srv.log` (stderr lines)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServeProcess:
    def __init__(self, config: str | Path, *overrides: str, start_timeout_s: float = 120.0) -> None:
        args = [sys.executable, "-m", "asyncbatch", "serve", str(config), "--port", "0"]
        for o in overrides:
            args += ["--set", o]
        self.args = args
        self.start_timeout_s = start_timeout_s
        self.log: list[str] = []
        self.url = ""
        self.front_end_pid: int | None = None
        self.code: int | None = None
        self._ready = threading.Event()

    def __enter__(self) -> ServeProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(self.start_timeout_s) or not self.url:
            self.proc.kill()
            raise AssertionError("the server did not get ready:\n" + self.text)
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.log.append(line)
            if (m := re.search(r"HTTP front end: process (\d+)", line)) is not None:
                self.front_end_pid = int(m.group(1))
            if (m := re.search(r"ready: serving .* on (http://[\d.]+:\d+)", line)) is not None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # it ended before it got ready

    @property
    def text(self) -> str:
        return "".join(self.log)

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code; the process is killed (and the test fails) if it has not ended within `timeout_s`."""
        try:
            self.code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not exit within {timeout_s} s:\n" + self.text) from None
        time.sleep(0.1)  # the reader thread takes the last lines
        return self.code

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
