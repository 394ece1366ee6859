"""Chrome/Perfetto trace export of a run's timeline (host phases and device streams).

The format is the Trace Event JSON that chrome://tracing and ui.perfetto.dev open: one complete event (`ph: "X"`)
per span, timestamps and durations in microseconds. Each stream gets its own thread track and the host gets one
more, so the overlap (or the lack of it) between host work and device work is visible at a glance.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HOST_TRACK = "host"
_PID = 1
# Pipeline order, so the tracks read top to bottom as a batch flows through them; unknown streams follow.
_TRACK_ORDER = ("host", "h2d", "copy", "main", "compute", "d2h")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)  # torch dtypes, devices and the like: readable beats failing the export


def _track_ids(spans: list[Any]) -> dict[str, int]:
    names = {HOST_TRACK} | {s.track for s in spans}
    known = [t for t in _TRACK_ORDER if t in names]
    rest = sorted(names - set(known))
    return {name: i for i, name in enumerate([*known, *rest])}


def to_chrome_trace(spans: Iterable[Any], process_name: str) -> dict[str, Any]:
    """Spans (anything with track, name, start, end, batch, args; seconds) -> a Trace Event JSON object."""
    spans = sorted(spans, key=lambda s: (s.start, s.end))
    tids = _track_ids(spans)
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": _PID, "tid": 0, "name": "process_name", "args": {"name": process_name}},
    ]
    for track, tid in tids.items():
        events.append({"ph": "M", "pid": _PID, "tid": tid, "name": "thread_name", "args": {"name": track}})
        events.append({"ph": "M", "pid": _PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    for s in spans:
        args = {"batch": s.batch, **_jsonable(dict(getattr(s, "args", None) or {}))}
        events.append({
            "ph": "X", "pid": _PID, "tid": tids[s.track], "name": s.name,
            "cat": "host" if s.track == HOST_TRACK else "device",
            "ts": s.start * 1e6, "dur": max(0.0, (s.end - s.start) * 1e6), "args": args,
        })
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"process": process_name}}


def write_chrome_trace(spans: Iterable[Any], path: str | Path, process_name: str) -> Path:
    """Write `to_chrome_trace(spans, process_name)` to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(spans, process_name)))
    return path
