"""Sweep tables: one row per run (`sweep.csv`/`sweep.json`), the replicate aggregate (`aggregate.csv`/`.json`),
and the text the CLI prints after an experiment.

Replicates are runs that differ only by repetition (`repeat: N`) or by a swept seed (`seed`, `engine.seed`,
`workload.seed`). For each group of replicates and each metric the aggregate gives the mean, the sample standard
deviation `s` (n - 1 in the denominator) and the half-width of a 95% confidence interval of the mean,
``t(0.975, n - 1) * s / sqrt(n)``, Student's t from `T975` (the runs are taken as independent draws).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..core.config import unstructure
from ..core.replicates import SEED_KEYS
from .report import fmt, format_table, ms, prefix_cache_on, short_names, summary_table, write_csv, write_json

LATENCY_COLUMNS = tuple(f"{name}_{q}_ms" for name in ("ttft", "itl", "e2e") for q in ("p50", "p90", "p95", "p99", "mean"))
METRIC_COLUMNS = ("tok_s", "generated_tokens", "wall_s", *LATENCY_COLUMNS, "busy_fraction", "host_ms_step",
                  "compute_ms_step", "steps", "preemptions", "startup_s", "prefix_cache_hit_rate",
                  "prefill_tokens_saved")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom, then 40, 60 and 120. Between tabulated
# values the smaller df's quantile is used, so an interval is never narrower than the exact one (and at most 1%
# wider past df 30).
T975 = {**dict(enumerate((12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
                          2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
                          2.060, 2.056, 2.052, 2.048, 2.045, 2.042), start=1)),
        40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T975[max(d for d in T975 if d <= df)]


def mean_std_ci(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, sample standard deviation and 95% CI half-width; None where there are too few values."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t975(n - 1) * std / math.sqrt(n)


# ---------------------------------------------------------------- one row per run


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The metric columns of a run, from its summary as written in results.json (`attrs.asdict(RunSummary)`);
    latencies in ms. Fields an older results.json lacks come out None."""
    s = summary.get
    return {"tok_s": s("tokens_per_s"), "generated_tokens": s("generated_tokens"), "wall_s": s("wall_s"),
            **{f"{name}_{q}_ms": ms(s(f"{name}_{q}")) for name in ("ttft", "itl", "e2e")
               for q in ("p50", "p90", "p95", "p99", "mean")},
            "busy_fraction": s("compute_busy_fraction"), "host_ms_step": s("host_step_ms"),
            "compute_ms_step": s("compute_step_ms"), "steps": s("steps"), "preemptions": s("preemptions"),
            "startup_s": s("startup_s"), "prefix_cache_hit_rate": s("prefix_cache_hit_rate"),
            "prefill_tokens_saved": s("prefill_tokens_saved")}


def sweep_row(cell: Any) -> dict[str, Any]:
    return {**{k: unstructure(v) for k, v in cell.assignment.items()}, "rep": cell.repetition,
            **summary_metrics(attrs.asdict(cell.summary))}


def write_sweep(out_dir: Path, keys: Sequence[str], cells: Sequence[Any], *,
                repeat: int = 1) -> list[dict[str, Any]]:
    rows = [sweep_row(c) for c in cells]
    write_json(out_dir / "sweep.json", {"keys": list(keys), "repeat": repeat,
                                        "runtime": cells[0].runtime if cells else None,
                                        "online": any(c.online for c in cells), "rows": rows})
    write_csv(out_dir / "sweep.csv", [*keys, "rep", *METRIC_COLUMNS], rows)
    return rows


def _show_prefix_cache(keys: Sequence[str], rows: Sequence[dict[str, Any]], prefix_cache: bool,
                       column: str = "prefix_cache_hit_rate") -> bool:
    """The cache hit rate column shows when a run enabled a prefix cache, a sweep key is about one, or a run
    read tokens from one."""
    return prefix_cache or any("prefix_cache" in k for k in keys) or any(r.get(column) for r in rows)


def sweep_table(keys: Sequence[str], rows: Sequence[dict[str, Any]], *, prefix_cache: bool = False) -> str:
    reps = any(r.get("rep", 0) for r in rows)
    cols = ["tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
            "busy_fraction", "host_ms_step", "steps", "preemptions"]
    names = ["tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "e2e p50", "e2e p99", "busy",
             "host ms/step", "steps", "preempt"]
    if _show_prefix_cache(keys, rows, prefix_cache):
        cols += ["prefix_cache_hit_rate", "prefill_tokens_saved"]
        names += ["cache hit", "prefill saved"]
    three = ("busy_fraction", "prefix_cache_hit_rate")
    headers = short_names(keys) + (["rep"] if reps else []) + names
    body = [[fmt(r[k]) for k in keys] + ([r["rep"]] if reps else [])
            + [fmt(r.get(c), 3) if c in three and r.get(c) is not None else r.get(c) for c in cols] for r in rows]
    return format_table(headers, body) + "\n(latencies in ms)"


# ---------------------------------------------------------------- replicates


def group_keys(keys: Sequence[str]) -> list[str]:
    """The sweep keys that tell replicate groups apart: all but the seeds."""
    return [k for k in keys if k not in SEED_KEYS]


def aggregate(keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One row per replicate group, in first-appearance order: the group's key values, `n` (runs), and
    `<metric>_mean`, `<metric>_std`, `<metric>_ci95` for every metric. None when no group has two runs."""
    by = group_keys(keys)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row[k] for k in by], sort_keys=True, default=str), []).append(row)
    if all(len(g) == 1 for g in groups.values()):
        return None
    out = []
    for members in groups.values():
        agg: dict[str, Any] = {k: members[0][k] for k in by}
        agg["n"] = len(members)
        for col in METRIC_COLUMNS:
            mean, std, ci = mean_std_ci([m[col] for m in members if m[col] is not None])
            agg.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_ci95": ci})
        out.append(agg)
    return out


def aggregate_columns(keys: Sequence[str]) -> list[str]:
    return [*group_keys(keys), "n", *(f"{c}_{s}" for c in METRIC_COLUMNS for s in ("mean", "std", "ci95"))]


def write_aggregate(out_dir: Path, keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    write_json(out_dir / "aggregate.json", {
        "keys": group_keys(keys), "replicate_keys": ["rep", *(k for k in keys if k in SEED_KEYS)],
        "confidence": 0.95, "interval": "mean +/- t(0.975, n-1) * std / sqrt(n)", "rows": list(rows)})
    write_csv(out_dir / "aggregate.csv", aggregate_columns(keys), rows)


def _pm(row: dict[str, Any], col: str, digits: int = 2) -> str:
    mean, ci = row[f"{col}_mean"], row[f"{col}_ci95"]
    return fmt(mean, digits) if ci is None else f"{fmt(mean, digits)} ± {fmt(ci, digits)}"


def aggregate_table(keys: Sequence[str], rows: Sequence[dict[str, Any]], *, prefix_cache: bool = False) -> str:
    by = group_keys(keys)
    cols = [("tok/s", "tok_s"), ("TTFT p50", "ttft_p50_ms"), ("TTFT p99", "ttft_p99_ms"), ("ITL p50", "itl_p50_ms"),
            ("e2e p50", "e2e_p50_ms"), ("busy", "busy_fraction")]
    if _show_prefix_cache(keys, rows, prefix_cache, "prefix_cache_hit_rate_mean"):
        cols.append(("cache hit", "prefix_cache_hit_rate"))
    headers = short_names(by) + ["n"] + [h for h, _ in cols]
    body = [[fmt(r[k]) for k in by] + [r["n"]]
            + [_pm(r, c, 3 if c in ("busy_fraction", "prefix_cache_hit_rate") else 2) for _, c in cols] for r in rows]
    return format_table(headers, body) + "\n(mean ± 95% confidence half-width over replicates; latencies in ms)"


# ---------------------------------------------------------------- what the CLI prints


def report_text(result: Any) -> str:
    """The tables and file list printed after `run_experiment` (given its `ExperimentResult`)."""
    out = result.out_dir
    if not result.rows:
        (cell,) = result.cells
        lines = [summary_table(cell.summary, cell.runtime, prefix_cache=prefix_cache_on(cell.config.engine)),
                 f"results: {out / 'results.json'}"]
        if cell.trace is not None:
            lines.append(f"trace: {cell.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
        return "\n".join(lines)
    cache = any(prefix_cache_on(c.config.engine) for c in result.cells)
    lines = [sweep_table(result.keys, result.rows, prefix_cache=cache),
             f"sweep: {out / 'sweep.csv'}, {out / 'sweep.json'}"]
    if result.aggregate:
        lines += ["", aggregate_table(result.keys, result.aggregate, prefix_cache=cache),
                  f"aggregate: {out / 'aggregate.csv'}, {out / 'aggregate.json'}"]
    if result.plots:
        lines.append("plots: " + ", ".join(str(p) for p in result.plots))
    return "\n".join(lines)
