"""Per-step statistics and the run summary: frozen values handed to lifecycle hooks and written to results."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .types import Output

if TYPE_CHECKING:
    from .races import RaceReport


@attrs.frozen
class StepStats:
    """One batch, as seen when the host updated it. Times in seconds; `compute_s` is device time if measured."""

    batch: int
    slot: int
    num_seqs: int
    num_tokens: int
    num_decode: int
    padded_tokens: int
    graph_replay: bool
    schedule_s: float
    prepare_s: float
    launch_s: float
    wait_s: float
    update_s: float
    compute_s: float | None = None
    num_context: int = 0  # KV positions the step's sequences attend over (their lengths after the step)
    time_s: float = 0.0  # when the host finished updating this batch, on the runtime's clock from the run's start
    fresh_tokens: bool = False  # planned after reading every in-flight token (`Scheduler.needs_fresh_tokens`)

    @property
    def host_s(self) -> float:
        """Host work per step that overlap can hide: scheduling, input preparation, launch and update. Each is
        host work only: device work a runtime does on the host thread (`cpu`, `sim`) is in `wait_s`."""
        return self.schedule_s + self.prepare_s + self.launch_s + self.update_s


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@attrs.frozen
class RunContext:
    """What a run is part of, for lifecycle hooks (`asyncbatch_run_started`, `asyncbatch_run_finished`).

    `config` is the experiment as a plain dict (`ExperimentConfig.to_dict()`); a bare `Engine.run` call gives
    ``{"engine": <its EngineConfig as a dict>}``, so ``config["engine"]`` is always there. `cell` is the sweep
    cell's index and `assignment` its dotted key -> value mapping (empty without a sweep); `repetition` counts the
    runs of one cell under `repeat: N` from 0. `out_dir` is where the run's files go (None outside an
    experiment); `num_requests` how many requests the run was given.
    """

    config: dict
    cell: int = 0
    assignment: dict = attrs.Factory(dict)
    repetition: int = 0
    out_dir: Path | None = None
    num_requests: int = 0


@attrs.frozen
class RunSummary:
    """Throughput and latency of one run. Latencies in seconds; None where there was nothing to measure.

    Percentiles interpolate linearly between the nearest ranks (numpy's default): TTFT and end-to-end latency
    over requests, inter-token latency over every gap between consecutive tokens of a request. The fields added
    after `startup_s` (p90, p95, mean) have defaults so that older code building a summary keeps working.
    """

    num_requests: int
    finish_reasons: dict
    generated_tokens: int
    prompt_tokens: int
    wall_s: float
    tokens_per_s: float
    steps: int
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    host_step_ms: float | None
    schedule_ms: float | None
    prepare_ms: float | None
    update_ms: float | None
    compute_step_ms: float | None
    compute_busy_fraction: float | None
    preemptions: int
    # Lifecycle hook calls of this run that raised, `asyncbatch_run_finished` included; the summary those hooks get
    # is built before they run, so it counts only the failures before them.
    hook_errors: int = 0
    startup_s: float | None = None  # build, compile and capture before the clock started (not in wall_s)
    ttft_p90: float | None = None
    ttft_p95: float | None = None
    ttft_mean: float | None = None
    itl_p90: float | None = None
    itl_p95: float | None = None
    itl_mean: float | None = None
    e2e_p90: float | None = None
    e2e_p95: float | None = None
    e2e_mean: float | None = None
    # Prefix caching: prompt tokens whose KV came from the cache (`Output.num_cached_tokens`), and their share of the
    # prompt tokens, both over the requests that ran (finish reason other than `error`). The rate is 0 without a
    # prefix cache, None when no prompt token ran; preempted requests count their cached tokens once per
    # admission, so it can pass 1 only through preemption.
    prefill_tokens_saved: int = 0
    prefix_cache_hit_rate: float | None = None
    # CPU time of the process's threads other than the step loop's during the run, per step: torch's and the
    # driver's threads (and a front end's, when one shares the process). What a server adds to it is its cost.
    cpu_outside_loop_ms: float | None = None

    @classmethod
    def build(cls, outputs: Sequence[Output], steps: Sequence[StepStats], wall_s: float, *,
              busy_fraction: float | None, preemptions: int, hook_errors: int = 0,
              startup_s: float | None = None, cpu_outside_loop_s: float | None = None) -> RunSummary:
        reasons: dict[str, int] = {}
        for o in outputs:
            reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
        gen = sum(len(o.token_ids) for o in outputs)
        latencies = {
            "ttft": [o.ttft for o in outputs if o.ttft is not None],
            "itl": [x for o in outputs for x in o.inter_token_latencies],
            "e2e": [o.latency for o in outputs if o.finish_reason != "error"],
        }
        spread = {f"{name}_p{q}": percentile(values, q) for name, values in latencies.items() for q in (50, 90, 95, 99)}
        spread.update({f"{name}_mean": _mean(values) for name, values in latencies.items()})
        computes = [s.compute_s for s in steps if s.compute_s is not None]
        ran = [o for o in outputs if o.finish_reason != "error"]
        saved, ran_prompt = sum(o.num_cached_tokens for o in ran), sum(len(o.prompt_ids) for o in ran)
        ms = 1e3
        return cls(
            num_requests=len(outputs), finish_reasons=reasons, generated_tokens=gen,
            prompt_tokens=sum(len(o.prompt_ids) for o in outputs), wall_s=wall_s,
            tokens_per_s=gen / wall_s if wall_s > 0 else 0.0, steps=len(steps), **spread,
            host_step_ms=_scale(_mean([s.host_s for s in steps]), ms),
            schedule_ms=_scale(_mean([s.schedule_s for s in steps]), ms),
            prepare_ms=_scale(_mean([s.prepare_s for s in steps]), ms),
            update_ms=_scale(_mean([s.update_s for s in steps]), ms),
            compute_step_ms=_scale(_mean(computes), ms),
            compute_busy_fraction=busy_fraction, preemptions=preemptions, hook_errors=hook_errors,
            startup_s=startup_s, prefill_tokens_saved=saved,
            prefix_cache_hit_rate=saved / ran_prompt if ran_prompt else None,
            cpu_outside_loop_ms=cpu_outside_loop_s / len(steps) * ms if cpu_outside_loop_s is not None and steps else None)


def cpu_times() -> tuple[float, float]:
    """(the calling thread's, the whole process's) CPU seconds, read one after the other."""
    return time.thread_time(), time.process_time()


def cpu_outside_thread(since: tuple[float, float]) -> float:
    """CPU seconds the process's other threads used since `since` (a `cpu_times()` of this thread)."""
    thread, process = cpu_times()
    return max(0.0, (process - since[1]) - (thread - since[0]))


def _scale(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


@attrs.frozen
class RunResult:
    """What `Engine.run` returns: outputs in input order, the summary, every step's statistics."""

    outputs: list[Output]
    summary: RunSummary
    steps: list[StepStats]
    races: RaceReport | None = None  # None: the runtime does not check; empty (falsey): checked, none found
