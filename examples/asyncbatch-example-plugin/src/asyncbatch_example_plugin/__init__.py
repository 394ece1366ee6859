"""An example third-party asyncbatch plugin.

Installed, it is found through the entry point ``example`` of the group ``asyncbatch`` (see pyproject.toml) and
adds:

* scheduler ``longest_wait`` (`LongestWait`): decode first, then admit the waiting request that waited longest
  relative to its prompt length (score ``steps_waited * aging_tokens - prompt_tokens``). YAML:
  ``engine.scheduler: {name: longest_wait, aging_tokens: 16}``.
* a metrics observer: a histogram of batch sizes and the slowest host step, per run, in `METRICS`, and written to
  the JSON file named by ``$ASYNCBATCH_EXAMPLE_METRICS`` at the end of every run.

Importing this module is light: no torch (the scheduler contract forbids it, and `asyncbatch list` stays fast).
"""

from __future__ import annotations

from typing import Any

import asyncbatch

from .metrics import ENV_VAR, METRICS, StepMetrics
from .scheduler import LongestWait, LongestWaitConfig

__all__ = ["ENV_VAR", "METRICS", "LongestWait", "LongestWaitConfig", "StepMetrics"]
__version__ = "0.1.0"


@asyncbatch.hookimpl
def asyncbatch_register_schedulers(register: Any) -> None:
    register("longest_wait", LongestWait)


@asyncbatch.hookimpl
def asyncbatch_step_finished(stats: Any) -> None:
    METRICS.on_step(stats)


@asyncbatch.hookimpl
def asyncbatch_request_finished(output: Any) -> None:
    METRICS.on_request(output)


@asyncbatch.hookimpl
def asyncbatch_run_finished(summary: Any) -> None:
    METRICS.on_run(summary)
