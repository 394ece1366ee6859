"""Text tables and result files: the formatting and writing that runs, sweeps and comparisons share."""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.stats import RunSummary

_NUMBER = re.compile(r"-?[0-9.]+(e[-+]?[0-9]+)?|n/a")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; numbers right-aligned, everything else left-aligned."""
    cells = [[str(h) for h in headers], *[[fmt(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [len(cells) > 1 and all(_NUMBER.fullmatch(r[i]) for r in cells[1:]) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] and n else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wrapped_table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None, *,
                  below: int | None = None) -> str:
    """`format_table` fitted to `width` characters; `width=None` keeps one line per row (for grep and scripts).

    When a row does not fit, column `below` (if given) moves under its row, indented past the first column and
    wrapped to the rest of the width; then the columns still too wide wrap, the last first, none below 16."""
    if width is None or max(len(line) for line in format_table(headers, rows).splitlines()) <= width:
        return format_table(headers, rows)
    cells = [[str(h) for h in headers], *[[str(v) for v in row] for row in rows]]
    under = [r.pop(below) for r in cells] if below is not None else None
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for i in reversed(range(len(widths))):
        over = sum(widths) + 2 * (len(widths) - 1) - width
        if over <= 0:
            break
        widths[i] = max(16, widths[i] - over)
    indent = " " * (widths[0] + 2)
    lines = []
    for n, row in enumerate(cells):
        pieces = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(row, widths, strict=True)]
        for k in range(max(len(p) for p in pieces)):
            lines.append("  ".join((p[k] if k < len(p) else "").ljust(w) for p, w in zip(pieces, widths)).rstrip())
        if under is not None and under[n] not in ("", "-"):
            lines.extend(textwrap.wrap(under[n], max(width, len(indent) + 16), initial_indent=indent,
                                       subsequent_indent=indent, break_on_hyphens=False))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    if isinstance(value, dict):
        name = value.get("name")
        rest = ", ".join(f"{k}={fmt(v)}" for k, v in value.items() if k != "name")
        return f"{name}({rest})" if name is not None else "{" + rest + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def short_names(keys: Any) -> list[str]:
    """Each dotted key by its last part, or by as many trailing parts as tell it from the others: a sweep of
    `engine.seed` and `seed` is labelled `engine.seed=1, seed=3`, not `seed=1, seed=3`."""
    keys = list(keys)
    out = []
    for k in keys:
        parts = k.split(".")
        n = 1
        while n < len(parts) and any(o != k and (o == ".".join(parts[-n:]) or o.endswith("." + ".".join(parts[-n:])))
                                     for o in keys):
            n += 1
        out.append(".".join(parts[-n:]))
    return out


def cell_label(assignment: dict[str, Any], sep: str = ", ") -> str:
    return sep.join(f"{k}={fmt(v)}" for k, v in zip(short_names(assignment), assignment.values())) or "run"


def _spread(s: RunSummary, name: str) -> str:
    """`p50 / p90 / p99 / mean` of one latency, in ms."""
    return " / ".join(fmt(ms(getattr(s, f"{name}_{q}"))) for q in ("p50", "p90", "p99", "mean"))


def prefix_cache_on(engine: Any) -> bool:
    """Whether an `EngineConfig` (or its dict) enables a prefix cache: `engine.prefix_cache` other than `none`
    (False where the engine has no such key)."""
    value = engine.get("prefix_cache") if isinstance(engine, dict) else getattr(engine, "prefix_cache", None)
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", value)
    return name not in (None, "none")


def summary_table(summary: RunSummary, runtime: str, *, prefix_cache: bool = False) -> str:
    """The metric/value table of one run. The prefix cache line shows when `prefix_cache` (the run enabled one)
    or when some prompt tokens came from a cache."""
    s = summary
    host = (f"{fmt(s.host_step_ms)} (schedule {fmt(s.schedule_ms)} / prepare {fmt(s.prepare_ms)} / "
            f"update {fmt(s.update_ms)})")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.finish_reasons.items())) or "none"
    # The sim runtime's clock is virtual, but step phases are timed on the real host clock.
    clock = " (wall, latencies, busy: virtual time from the cost model; host ms: real)" if runtime == "sim" else ""
    rows = [
        ("runtime", runtime + clock),
        ("requests", s.num_requests),
        ("generated tokens", s.generated_tokens),
        ("prompt tokens", s.prompt_tokens),
        ("start-up s (not in wall)", fmt(s.startup_s)),
        ("wall s", f"{s.wall_s:.3f}"),
        ("tokens/s", f"{s.tokens_per_s:.1f}"),
        ("TTFT ms p50 / p90 / p99 / mean", _spread(s, "ttft")),
        ("ITL ms p50 / p90 / p99 / mean", _spread(s, "itl")),
        ("e2e ms p50 / p90 / p99 / mean", _spread(s, "e2e")),
        ("steps", s.steps),
        ("host ms/step", host),
        ("other threads' CPU ms/step", fmt(s.cpu_outside_loop_ms)),
        ("device compute ms/step", fmt(s.compute_step_ms)),
        ("compute busy fraction", fmt(s.compute_busy_fraction, 3)),
        ("preemptions", s.preemptions),
        ("finish reasons", reasons),
    ]
    if prefix_cache or s.prefill_tokens_saved:
        rows.insert(4, ("prefix cache hit rate", f"{fmt(s.prefix_cache_hit_rate, 3)} "
                                                 f"({s.prefill_tokens_saved} prefill tokens saved)"))
    if s.hook_errors:
        rows.append(("plugin hook errors", s.hook_errors))
    return format_table(("metric", "value"), rows)


def every_request_failed(result: Any) -> str | None:
    """Why an experiment in which every request of every run failed (finish reason `error`) did nothing, with
    one request's reason from its results.json; None when any request ran. A run that only fails requests is
    not a success (`asyncbatch run` exits 1), though each request's failure is its own (the others run on)."""
    cells = list(result)
    if not cells or any(set(c.summary.finish_reasons) != {"error"} for c in cells):
        return None
    total = sum(c.summary.num_requests for c in cells)
    runs = f" in {len(cells)} runs" if len(cells) > 1 else ""
    path = cells[0].out_dir / "results.json"
    try:
        first = next(o for o in json.loads(path.read_text())["outputs"] if o.get("error"))
        example = f", e.g. {first['request_id']}: {first['error']}"
    except (OSError, ValueError, KeyError, StopIteration, TypeError):  # a rank that keeps no files: no example
        example = ""
    return f"every request failed ({total} of {total}{runs}){example} (results: {path})"


# ---------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """One row per dict; lists and mappings (component values of sweep keys) as JSON, so they read back."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})


def checked_out_dir(path: str | Path, *, force: bool, key: str = "--out") -> Path:
    """A given output directory: refused if it is a file, or holds files and `force` is off, so results are never
    silently mixed with or written over an earlier run's. Errors name `key`, the option that gave it."""
    if not str(path):
        raise ConfigError(key, "an empty path: give the directory to write")
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(key, f"{path} exists and is not a directory")
        if not force and path.is_dir() and any(path.iterdir()):
            raise ConfigError(key, f"{path} exists and is not empty: choose another directory, or pass --force "
                                   "(force=True) to write into it")
    except OSError as exc:  # a name too long, a parent that cannot be searched or read
        raise ConfigError(key, f"cannot use {path}: {exc.strerror or exc}") from None
    return path


def make_dir(path: Path, key: str) -> Path:
    """Create a result directory (and its parents); one that cannot be made is a `ConfigError` on `key`, the
    option or setting that named it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create the directory {path}: {exc.strerror or exc}") from None
    return path


def stamped_dir(parent: str | Path, name: str, key: str = "output.dir") -> Path:
    """`parent/<name>-<timestamp>`, suffixed -2, -3, ... when that exists (two runs in one second). A parent that
    cannot be looked into is a `ConfigError` on `key`, the setting that named it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{slug(name)}-{stamp}"
    path, n = base, 1
    try:
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    except OSError as exc:  # a name too long, a parent that cannot be searched
        raise ConfigError(key, f"cannot use {path}: {exc.strerror or exc}") from None
    return path


SLUG_MAX = 100  # characters of a slug: a file name's 255 bytes hold it with a timestamp or a cell's number


def slug(text: str) -> str:
    """`text` as a file name: runs of other characters than letters, digits and `=._-` become one `_`. One longer
    than `SLUG_MAX` keeps its head and ends with a digest of the whole text, so distinct texts stay distinct."""
    name = re.sub(r"[^A-Za-z0-9=._-]+", "_", text).strip("_") or "run"
    if len(name) > SLUG_MAX:
        name = f"{name[:SLUG_MAX - 9]}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return name
