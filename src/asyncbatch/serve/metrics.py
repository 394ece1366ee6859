"""Prometheus metrics of a serving engine (`GET /metrics`), in a registry of their own.

Gauges are read from the live engine when scraped; counters and histograms are fed by the step loop through the
`ServeObserver` calls. Times are host clock: a request's TTFT runs from its submission to the moment the step loop
read its first token from the device, and each inter-token latency between two such readings.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from ..core.stats import StepStats
from ..core.types import Output
from .base import LiveEngine, ServeObserver

BUSY_WINDOW_S = 10.0
_TTFT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
         20.0, 40.0, 80.0)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
        0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServeMetrics(ServeObserver):
    """The metrics of one `AsyncEngine` (one of its observers: `build_app` adds it). `render()` is the scrape."""

    def __init__(self, live: LiveEngine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.live = live
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("asyncbatch_time_to_first_token_seconds", "Submission to first token, host clock",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram("asyncbatch_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("asyncbatch_e2e_request_latency_seconds", "Submission to end of a request",
                             buckets=_E2E, registry=r)
        self.step_time = Histogram("asyncbatch_step_seconds", "Host time of one step (schedule, prepare, launch, "
                                   "wait, update)", buckets=_ITL, registry=r)
        self.steps = Counter("asyncbatch_steps", "Steps read back", registry=r)
        self.host_work = Counter("asyncbatch_step_host_work_seconds", "Host work of the steps: schedule, prepare, "
                                 "launch and update, without the waits on the device", registry=r)
        self.compute = Counter("asyncbatch_device_compute_seconds", "Device compute time of the steps, where the "
                               "runtime measures it (rate() is the busy fraction)", registry=r)
        self.generated = Counter("asyncbatch_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("asyncbatch_prompt_tokens", "Prompt tokens of ended requests", registry=r)
        self.finished_total = Counter("asyncbatch_requests_finished", "Requests ended, by the engine's finish "
                                      "reason (cancelled: client gone or stop string met)", ["finish_reason"],
                                      registry=r)
        self.rejected_total = Counter("asyncbatch_requests_rejected", "Requests refused at submission",
                                      ["reason"], registry=r)
        self._window: deque[tuple[float, float]] = deque()  # (host time, compute seconds) of recent steps
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        r.register(_Gauges(self))

    # ---- the step loop's thread
    def step(self, stats: StepStats) -> None:
        self.steps.inc()
        self.step_time.observe(stats.schedule_s + stats.prepare_s + stats.launch_s + stats.wait_s + stats.update_s)
        self.host_work.inc(stats.host_s)  # as `asyncbatch run` reports host time per step
        if stats.compute_s is not None:
            self.compute.inc(stats.compute_s)
            now = time.perf_counter()
            with self._lock:
                self._window.append((now, stats.compute_s))
                while self._window and self._window[0][0] < now - BUSY_WINDOW_S:
                    self._window.popleft()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated.inc()

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.generated.inc()

    def finished(self, output: Output, seconds: float) -> None:
        self.e2e.observe(seconds)
        self.prompt.inc(len(output.prompt_ids))
        self.finished_total.labels(output.finish_reason).inc()

    def rejected(self, reason: str) -> None:
        self.rejected_total.labels(reason).inc()

    # ---- scrapes
    def busy_fraction(self) -> float | None:
        """Device compute time over the last `BUSY_WINDOW_S` seconds of wall time (None before any measured step)."""
        now = time.perf_counter()
        with self._lock:
            if not self._window:
                return None
            busy = sum(c for t, c in self._window if t >= now - BUSY_WINDOW_S)
        return min(1.0, busy / max(1e-9, min(BUSY_WINDOW_S, now - self._started)))

    def render(self) -> tuple[bytes, str]:
        """The scrape: body and content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Gauges:
    """The live engine's state, read when scraped."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.metrics.live.stats()
        yield GaugeMetricFamily("asyncbatch_requests_waiting", "Requests waiting for a row (the queue)",
                                value=s["waiting"])
        yield GaugeMetricFamily("asyncbatch_requests_running", "Requests holding a row", value=s["running"])
        yield GaugeMetricFamily("asyncbatch_kv_blocks_used", "KV cache blocks held by requests",
                                value=s["kv_blocks_used"])
        yield GaugeMetricFamily("asyncbatch_kv_blocks_total", "KV cache blocks requests can hold",
                                value=s["kv_blocks_total"])
        # What serving costs the engine's process beyond the step loop: the process's CPU time minus the step loop
        # thread's. With the HTTP side in the same process that is HTTP, JSON, detokenising and streaming; with a
        # front-end process, only the hand-over of requests and tokens (the front end's own CPU is counted apart).
        yield CounterMetricFamily("asyncbatch_step_loop_cpu_seconds", "CPU time of the step loop's thread between "
                                  "its steps", value=s["step_loop_cpu_s"])
        yield CounterMetricFamily("asyncbatch_process_cpu_seconds", "CPU time of the engine's process (all "
                                  "threads)", value=s["engine_cpu_s"])
        if s["handover_s"] is not None:
            yield CounterMetricFamily("asyncbatch_step_loop_handover_seconds", "Step loop time spent sending each "
                                      "step's tokens to the front-end process", value=s["handover_s"])
        if s["front_end_cpu_s"] is not None:
            yield CounterMetricFamily("asyncbatch_front_end_cpu_seconds", "CPU time of the HTTP front-end process "
                                      "(engine.serve.front_end: process)", value=s["front_end_cpu_s"])
        busy = self.metrics.busy_fraction()
        if busy is not None:
            yield GaugeMetricFamily("asyncbatch_busy_fraction", f"Device compute time over the last "
                                    f"{BUSY_WINDOW_S:g} s of wall time", value=busy)
