"""The `asyncbatch` logger as the command line sets it up: one stderr line per record, `[asyncbatch] message`.
Both the command's process and a spawned front-end process call `setup_logging`."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is at emit time, so redirected or captured stderr keeps working."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging(level: str) -> None:
    log = logging.getLogger("asyncbatch")
    log.setLevel(getattr(logging, level.upper()))
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[asyncbatch] %(message)s"))
        log.addHandler(handler)
