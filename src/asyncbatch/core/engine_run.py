"""One `Engine.run`: from a list of requests to a `RunResult`.

The engine composes its pipeline once (`engine`); each run then does what this module holds, at its start and at
its end and never per step: a fresh request book (with the run's own prefix cache), the model put in the
engine's state with the collector paused, the sampling paths the build did not warm up, the lifecycle hooks
around the clock, a failure explained (a recorded race, or the strategy to blame), and the summary. The caller
holds the engine; this module reads the engine's parts and its private run state (cancels, collector).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .attention_api import deactivate
from .blame import blame
from .book import RequestBook
from .plugin_host import DEFAULT_PLUGINS
from .races import race_report, raise_if_racy
from .requests import Status
from .startup import request_modes
from .stats import RunContext, RunResult, RunSummary, cpu_outside_thread, cpu_times
from .types import Request, TokenEvent


def run_requests(engine: Any, requests: Sequence[Request], on_token: Callable[[TokenEvent], None] | None,
                 context: RunContext) -> RunResult:
    """Serve `requests` on `engine` (an `Engine` its caller holds) until all end; see `Engine.run`."""
    states = [engine.intake.state(r, i) for i, r in enumerate(requests)]
    host = engine.host
    notify_finish = host.has_lifecycle_impls("asyncbatch_request_finished")
    notify_step = host.has_lifecycle_impls("asyncbatch_step_finished")
    errors_before = host.hook_error_count
    book = RequestBook(states, num_blocks=engine.num_blocks, num_rows=engine.config.batch.max_seqs,
                       block_size=engine.config.cache.block_size, prefix_cache=engine.new_prefix_cache(),
                       on_finish=(lambda o: host.notify("asyncbatch_request_finished", output=engine._texted(o)))
                       if notify_finish else None, on_end=on_token)
    book.blocks.share_safely = not engine.pipeline.debug.unshared_release
    engine._cancels.attach(book)  # cancels sent before the run started apply now
    rt = engine.runtime
    try:
        engine._bind_model()
        if engine.warms_up:  # sampling paths the build did not warm up, before the clock starts
            engine.startup_s += engine.warm.modes(request_modes(r.params for r in states
                                                                if r.status is not Status.FINISHED))
        startup_s, engine.startup_s = engine.startup_s, 0.0
        if host.has_lifecycle_impls("asyncbatch_run_started"):  # before the clock: hook time is not run time
            host.notify("asyncbatch_run_started", context=context)
        rt.reset_timeline()
        start, cpu = rt.now(), cpu_times()
        steps = engine.pipeline.run(
            book, on_token=on_token,
            on_step=(lambda s: host.notify("asyncbatch_step_finished", stats=s)) if notify_step else None)
        other_cpu = cpu_outside_thread(cpu)
    except Exception as exc:
        raise_if_racy(rt, exc)  # a recorded race explains the failure: RaceError, chained from it
        blamed = blame(exc, engine._strategies, host, DEFAULT_PLUGINS)
        if blamed is not None:
            raise blamed from exc
        raise
    finally:
        engine._cancels.detach()
        deactivate()
        engine._collector.resume()
    wall = rt.now() - start
    try:
        book.check_released()
    except Exception as exc:
        raise_if_racy(rt, exc)
        raise
    outputs = [engine._texted(o) for o in book.results()]
    busy = rt.compute_busy()
    summary = RunSummary.build(outputs, steps, wall, busy_fraction=busy and busy.get("busy_fraction"),
                               preemptions=book.num_preemptions,
                               hook_errors=host.hook_error_count - errors_before, startup_s=startup_s,
                               cpu_outside_loop_s=other_cpu)
    if host.has_lifecycle_impls("asyncbatch_run_finished"):
        failed = host.notify("asyncbatch_run_finished", summary=summary, context=context)
        if failed:  # the hooks saw the summary before their own failures; the run's result counts them too
            summary = attrs.evolve(summary, hook_errors=summary.hook_errors + len(failed))
    engine.last_result = RunResult(outputs, summary, steps, races=race_report(rt))
    raise_if_racy(rt, result=engine.last_result)  # a racy run is a failed run; its result rides on the error
    return engine.last_result
