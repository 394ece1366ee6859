"""Step metrics collected through the lifecycle hooks: a histogram of batch sizes and the slowest host step.

`METRICS` is the process-wide collector the hooks feed. Read it in code (`METRICS.snapshot()`); set
`ASYNCBATCH_EXAMPLE_METRICS=/path/metrics.json` to also get the report written at the end of every run.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

ENV_VAR = "ASYNCBATCH_EXAMPLE_METRICS"


class _Run:
    """What one `run`/`generate` call looked like, step by step."""

    def __init__(self) -> None:
        self.steps = 0
        self.batch_sizes: Counter[int] = Counter()  # sequences per batch -> number of batches
        self.batch_tokens: Counter[int] = Counter()  # tokens per batch -> number of batches
        self.max_host_ms = 0.0
        self.max_host_batch: int | None = None
        self.finish_reasons: Counter[str] = Counter()

    def report(self) -> dict[str, Any]:
        return {
            "steps_seen": self.steps,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "batch_tokens_histogram": {str(k): v for k, v in sorted(self.batch_tokens.items())},
            "max_host_ms": self.max_host_ms,
            "max_host_batch": self.max_host_batch,
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
        }


class StepMetrics:
    """Thread-safe collector: the engine may call hooks from a background thread (`Engine.stream`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._current = _Run()
            self.runs: list[dict[str, Any]] = []

    # ---- fed by the hooks
    def on_step(self, stats: Any) -> None:
        host_ms = stats.host_s * 1e3
        with self._lock:
            run = self._current
            run.steps += 1
            run.batch_sizes[stats.num_seqs] += 1
            run.batch_tokens[stats.num_tokens] += 1
            if host_ms > run.max_host_ms or run.max_host_batch is None:
                run.max_host_ms, run.max_host_batch = host_ms, stats.batch

    def on_request(self, output: Any) -> None:
        with self._lock:
            self._current.finish_reasons[output.finish_reason] += 1

    def on_run(self, summary: Any) -> dict[str, Any]:
        with self._lock:
            report = self._current.report()
            self._current = _Run()
            report["summary"] = {
                "steps": summary.steps,
                "num_requests": summary.num_requests,
                "generated_tokens": summary.generated_tokens,
                "tokens_per_s": summary.tokens_per_s,
                "host_step_ms": summary.host_step_ms,
                "hook_errors": summary.hook_errors,
            }
            self.runs.append(report)
            payload = self._payload()
        path = os.environ.get(ENV_VAR)
        if path:
            _write_json(Path(path), payload)
        return report

    # ---- read by users and tests
    @property
    def last_run(self) -> dict[str, Any] | None:
        with self._lock:
            return self.runs[-1] if self.runs else None

    def snapshot(self) -> dict[str, Any]:
        """Every finished run, plus totals over them."""
        with self._lock:
            return self._payload()

    def _payload(self) -> dict[str, Any]:
        sizes: Counter[str] = Counter()
        for r in self.runs:
            sizes.update(r["batch_size_histogram"])
        return {
            "runs": [dict(r) for r in self.runs],
            "total_steps": sum(r["steps_seen"] for r in self.runs),
            "batch_size_histogram": {k: sizes[k] for k in sorted(sizes, key=int)},
            "max_host_ms": max((r["max_host_ms"] for r in self.runs), default=0.0),
        }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


METRICS = StepMetrics()
