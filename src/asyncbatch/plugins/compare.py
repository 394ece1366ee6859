"""`asyncbatch compare A B`: two result directories side by side, with the difference and the ratio per metric.

Each side is a run directory (`results.json`) or a sweep directory (`sweep.json`; with replicates its
`aggregate.json`, so means are compared and their 95% intervals kept). Sweep cells are matched by their
assignment (the swept keys and values); cells on one side only are listed. Two single runs are always paired,
whatever their assignments (e.g. two cells of one sweep).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..core.errors import ConfigError
from .report import cell_label, fmt, format_table, make_dir, write_csv, write_json
from .sweeps import METRIC_COLUMNS, summary_metrics

TABLE_METRICS = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
                 "busy_fraction", "host_ms_step")


@attrs.frozen
class ResultSet:
    """One side of a comparison: `entries` hold an assignment, metric values, 95% half-widths (or None) and n."""

    path: Path
    kind: str  # "run", "sweep", or "aggregate" (a sweep with replicates)
    keys: tuple[str, ...]
    entries: tuple[dict, ...]
    runtime: str | None = None  # the runtime the run (or the sweep's first cell) used, where recorded


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"cannot be read as asyncbatch results: {exc}") from exc


def load_results(path: str | Path) -> ResultSet:
    """A run or sweep directory (or its results.json / sweep.json) as a `ResultSet`."""
    given = Path(path)
    d = given.parent if given.is_file() and given.name in ("results.json", "sweep.json") else given
    if given.is_file() and d is given:
        raise ConfigError(str(given), "is a file, not a run directory: give a run directory (it holds "
                                      "results.json) or a sweep directory (it holds sweep.json), or one of those two "
                                      "files")
    if not d.is_dir():
        raise ConfigError(str(given), "not a results directory: no such directory (expected a run directory with "
                                      "results.json or a sweep directory with sweep.json)")
    if (d / "aggregate.json").is_file() and (d / "sweep.json").is_file():
        return _parsed(d / "aggregate.json", lambda data: _aggregate(d, data))
    if (d / "sweep.json").is_file():
        return _parsed(d / "sweep.json", lambda data: _sweep(d, data))
    if (d / "results.json").is_file():
        return _parsed(d / "results.json", lambda data: _run(d, data))
    raise ConfigError(str(given), "not a results directory: it has neither results.json (one run) nor sweep.json "
                                  "(a sweep)")


def _parsed(file: Path, build: Callable[[Any], ResultSet]) -> ResultSet:
    """`build(data of file)`; a file of another shape (a field missing or of the wrong type, a metric that is no
    number) is a `ConfigError` naming it, not an internal error."""
    data = _read(file)
    if not isinstance(data, dict):
        raise ConfigError(str(file), f"not asyncbatch results: expected a JSON object, got {type(data).__name__}")
    try:
        result = build(data)
        for entry in result.entries:
            for col, value in entry["values"].items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise TypeError(f"metric {col} is {value!r}, not a number")
    except ConfigError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        text = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(str(file), f"not asyncbatch results: {text}") from exc
    return result


def _field(data: dict, name: str, kind: type) -> Any:
    value = data[name]
    if not isinstance(value, kind):
        raise TypeError(f"'{name}' is {type(value).__name__}, not a{'n' if kind is dict else ''} "
                        f"{'object' if kind is dict else 'list'}")
    return value


def _aggregate(d: Path, data: dict) -> ResultSet:
    keys = tuple(_field(data, "keys", list))
    entries = [{"assignment": {k: r[k] for k in keys}, "n": r["n"],
                "values": {c: r.get(f"{c}_mean") for c in METRIC_COLUMNS},
                "ci95": {c: r.get(f"{c}_ci95") for c in METRIC_COLUMNS}} for r in _field(data, "rows", list)]
    return ResultSet(d, "aggregate", keys, tuple(entries), _read(d / "sweep.json").get("runtime"))


def _sweep(d: Path, data: dict) -> ResultSet:
    keys = tuple(_field(data, "keys", list))
    entries = [{"assignment": {k: r[k] for k in keys}, "n": 1, "values": {c: r.get(c) for c in METRIC_COLUMNS},
                "ci95": {}} for r in _field(data, "rows", list)]
    return ResultSet(d, "sweep", keys, tuple(entries), data.get("runtime"))


def _run(d: Path, data: dict) -> ResultSet:
    if "summary" not in data:
        raise ConfigError(str(d / "results.json"), "has no 'summary': not an asyncbatch results.json")
    assignment = data.get("assignment") or {}
    entry = {"assignment": dict(assignment), "n": 1, "values": summary_metrics(_field(data, "summary", dict)),
             "ci95": {}}
    return ResultSet(d, "run", tuple(assignment), (entry,), data.get("runtime"))


def _key(entry: dict) -> str:
    return json.dumps(entry["assignment"], sort_keys=True, default=str)


def _diff_ratio(a: Any, b: Any) -> tuple[float | None, float | None]:
    if a is None or b is None:
        return None, None
    return b - a, (b / a if a != 0 else None)


def compare(a: ResultSet, b: ResultSet) -> dict[str, Any]:
    """Matched pairs, one row per (pair, metric): a, b, diff = b - a, ratio = b / a (None where a is 0)."""
    if len(a.entries) == 1 and len(b.entries) == 1:
        pairs = [(a.entries[0], b.entries[0])]
    else:
        in_b = {_key(e): e for e in b.entries}
        pairs = [(e, in_b[_key(e)]) for e in a.entries if _key(e) in in_b]
    paired_a, paired_b = {_key(x) for x, _ in pairs}, {_key(y) for _, y in pairs}
    rows = []
    for ea, eb in pairs:
        label = cell_label(ea["assignment"]) if ea["assignment"] == eb["assignment"] else \
            f"{cell_label(ea['assignment'])} vs {cell_label(eb['assignment'])}"
        for col in METRIC_COLUMNS:
            va, vb = ea["values"].get(col), eb["values"].get(col)
            diff, ratio = _diff_ratio(va, vb)
            rows.append({**ea["assignment"], "cell": label, "metric": col, "a": va, "b": vb, "diff": diff,
                         "ratio": ratio, "a_ci95": ea["ci95"].get(col), "b_ci95": eb["ci95"].get(col),
                         "a_n": ea["n"], "b_n": eb["n"]})
    return {"a": {"path": str(a.path), "kind": a.kind, "keys": list(a.keys), "runtime": a.runtime},
            "b": {"path": str(b.path), "kind": b.kind, "keys": list(b.keys), "runtime": b.runtime},
            "rows": rows,
            "only_a": [e["assignment"] for e in a.entries if _key(e) not in paired_a],
            "only_b": [e["assignment"] for e in b.entries if _key(e) not in paired_b]}


def compare_table(result: dict[str, Any], metrics: Sequence[str] = TABLE_METRICS) -> str:
    def side(name: str) -> str:
        s = result[name]
        return f"{name.upper()}: {s['path']} ({s['kind']})"

    rows = [r for r in result["rows"] if r["metric"] in metrics]
    cells = len({r["cell"] for r in rows})
    headers = (["cell"] if cells > 1 else []) + ["metric", "A", "B", "B - A", "B / A"]
    body = [([r["cell"]] if cells > 1 else []) + [r["metric"], r["a"], r["b"], r["diff"],
                                                  None if r["ratio"] is None else fmt(r["ratio"], 3)] for r in rows]
    lines = [side("a"), side("b")]
    ra, rb = result["a"].get("runtime"), result["b"].get("runtime")
    if ra and rb and ra != rb:
        clock = " (the sim runtime's times are virtual)" if "sim" in (ra, rb) else ""
        lines.append(f"note: A ran on the {ra!r} runtime and B on {rb!r}: their times come from different "
                     f"clocks{clock}")
    if cells == 1:
        lines.append(f"cell: {rows[0]['cell']}")
    lines.append(format_table(headers, body) if rows else "no matched cells")
    for name in ("only_a", "only_b"):
        if result[name]:
            lines.append(f"only in {name[-1].upper()}: " + "; ".join(cell_label(x) for x in result[name]))
    return "\n".join(lines) + "\n(latencies in ms; A and B are means over replicates where a side has them)"


def write_compare(out_dir: Path, result: dict[str, Any], *, echo: Callable[[str], None] = print) -> list[Path]:
    """compare.json, compare.csv and compare.png (tok/s of both sides per matched cell)."""
    make_dir(out_dir, "--out")
    write_json(out_dir / "compare.json", result)
    keys = list(dict.fromkeys([*result["a"]["keys"], *result["b"]["keys"]]))
    write_csv(out_dir / "compare.csv", [*keys, "cell", "metric", "a", "b", "diff", "ratio", "a_ci95", "b_ci95",
                                        "a_n", "b_n"], result["rows"])
    written = [out_dir / "compare.json", out_dir / "compare.csv"]
    tok = [r for r in result["rows"] if r["metric"] == "tok_s"]
    if tok:
        from .plots import plot_compare

        names = {s: f"{s.upper()}: {Path(result[s]['path']).name}" for s in ("a", "b")}
        series = {names[s]: [(r[s] if r[s] is not None else float("nan"), r[f"{s}_ci95"]) for r in tok]
                  for s in ("a", "b")}
        png = plot_compare(out_dir / "compare.png", [r["cell"] for r in tok], series, "generated tokens / s",
                           "Throughput, A against B", echo=echo)
        if png is not None:
            written.append(png)
    return written
