"""Running YAML experiments: one run or a sweep of cells, results on disk, and the tables the CLI prints.

Every run leaves a directory that explains itself: `results.json` (summary, per-request and per-step numbers),
`config.yaml` (the fully resolved experiment, so `asyncbatch run <dir>/config.yaml` repeats it) and
`environment.json` (versions, platform, device, seed, command line). A sweep adds `sweep.csv`, `sweep.json`,
plots, and one sub-directory per cell.
"""

from __future__ import annotations

import csv
import datetime
import gc
import hashlib
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..core.config import ExperimentConfig, ModelConfig, unstructure
from ..core.plugin_host import PluginHost, get_plugin_host
from ..core.stats import RunSummary

Echo = Callable[[str], None]
_NUMBER = re.compile(r"-?[0-9.]+(e[-+]?[0-9]+)?|n/a")


@attrs.frozen
class CellResult:
    """One finished run (a sweep cell, or the whole experiment when there is no sweep)."""

    index: int
    assignment: dict
    config: ExperimentConfig
    summary: RunSummary
    runtime: str
    online: bool
    out_dir: Path
    trace: Path | None = None


# ---------------------------------------------------------------- formatting


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


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def cell_label(assignment: dict[str, Any], sep: str = ", ") -> str:
    return sep.join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in assignment.items()) or "run"


def summary_table(summary: RunSummary, runtime: str) -> str:
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
        ("TTFT p50 / p99 ms", f"{fmt(_ms(s.ttft_p50))} / {fmt(_ms(s.ttft_p99))}"),
        ("ITL p50 / p99 ms", f"{fmt(_ms(s.itl_p50))} / {fmt(_ms(s.itl_p99))}"),
        ("e2e p50 / p99 ms", f"{fmt(_ms(s.e2e_p50))} / {fmt(_ms(s.e2e_p99))}"),
        ("steps", s.steps),
        ("host ms/step", host),
        ("device compute ms/step", fmt(s.compute_step_ms)),
        ("compute busy fraction", fmt(s.compute_busy_fraction, 3)),
        ("preemptions", s.preemptions),
        ("finish reasons", reasons),
    ]
    if s.hook_errors:
        rows.append(("plugin hook errors", s.hook_errors))
    return format_table(("metric", "value"), rows)


# ---------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def make_out_dir(cfg: ExperimentConfig, out: str | None) -> Path:
    """`--out` as given, else `output.dir/<name>-<timestamp>` (suffixed when two runs share a second)."""
    if out is not None:
        path = Path(out)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output.dir) / f"{_slug(cfg.name)}-{stamp}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", text).strip("_") or "run"


def environment(cfg: ExperimentConfig, engine: Any, argv: Sequence[str]) -> dict[str, Any]:
    import torch
    import transformers

    import asyncbatch

    device = engine.runtime.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "asyncbatch": asyncbatch.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(), "device": str(device),
        "device_name": name, "cuda": torch.version.cuda, "runtime": engine.runtime.name,
        "attention": getattr(engine, "attention_name", None), "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed, "engine_seed": cfg.engine.seed, "model_seed": cfg.engine.model.seed,
        "command": list(argv),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def results_dict(cell_index: int, assignment: dict, cfg: ExperimentConfig, result: Any, runtime: str) -> dict:
    outputs = [{
        "request_id": o.request_id, "prompt_tokens": len(o.prompt_ids), "output_tokens": len(o.token_ids),
        "finish_reason": o.finish_reason, "error": o.error, "arrival_time": o.arrival_time, "ttft": o.ttft,
        "latency": o.latency, "num_preemptions": o.num_preemptions,
        # A digest, not the tokens: enough to check that a rerun produced the same text.
        "tokens_sha1": hashlib.sha1(",".join(map(str, o.token_ids)).encode()).hexdigest()[:16],
    } for o in result.outputs]
    steps = [{**attrs.asdict(s), "host_s": s.host_s} for s in result.steps]
    return {"name": cfg.name, "cell": cell_index, "assignment": assignment, "runtime": runtime,
            "summary": attrs.asdict(result.summary), "outputs": outputs, "steps": steps}


# ---------------------------------------------------------------- running


class ModelCache:
    """Keeps the last built model, so sweep cells with an identical `engine.model` section share it."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.key: ModelConfig | None = None
        self.value: tuple[Any, Any] | None = None

    def get(self, cfg: ModelConfig) -> tuple[Any, Any]:
        from ..core import models  # looked up at call time, so tests can stand in for build_model

        if self.value is None or self.key != cfg:
            self.value = None
            _free_memory()
            self.value = models.build_model(cfg, self.host)
            self.key = cfg
        return self.value


def _free_memory() -> None:
    # The previous engine (and model, if replaced) must be gone, its cached blocks returned to the driver, before
    # the next engine sizes its KV cache from free device memory. Engines hold reference cycles: collect.
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress_bar(enabled: bool, total: int, label: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc=label, leave=False, file=sys.stderr, dynamic_ncols=True)


def run_cell(index: int, assignment: dict, cfg: ExperimentConfig, cache: ModelCache, out_dir: Path, *,
             argv: Sequence[str], trace_path: Path | None, progress: bool, env_path: Path | None) -> CellResult:
    """Build the engine (reusing the cached model), run the workload, write the cell's files."""
    from ..core.engine import Engine

    _free_memory()
    start = time.perf_counter()
    model, tokenizer = cache.get(cfg.engine.model)
    model_s = time.perf_counter() - start  # zero when an earlier sweep cell built the same model
    show = progress and cfg.output.progress and cfg.engine.startup.progress
    engine_cfg = attrs.evolve(cfg.engine, startup=attrs.evolve(cfg.engine.startup, progress=show))
    engine = Engine.from_model(model, engine_cfg, tokenizer=tokenizer, host=cache.host)
    factory = cache.host.registry("workload").get(cfg.workload.name, "workload").factory
    workload = factory(cfg.workload.config, vocab_size=engine.geometry["vocab"], seed=cfg.seed)
    requests = workload.requests(cfg.sampling, tokenizer=engine.tokenizer)
    engine.runtime.record_spans = trace_path is not None
    bar = _progress_bar(progress and cfg.output.progress, sum(r.params.max_new_tokens for r in requests),
                        cell_label(assignment))
    try:
        result = engine.run(requests, on_token=(lambda ev: ev.token_id >= 0 and bar.update(1)) if bar is not None
                            else None)
    finally:
        if bar is not None:
            bar.close()
    # Start-up of this cell: building the model, the engine, and every compile and capture before the clock.
    result = attrs.evolve(result, summary=attrs.evolve(result.summary,
                                                       startup_s=model_s + (result.summary.startup_s or 0.0)))
    runtime = engine.runtime.name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results_dict(index, assignment, cfg, result, runtime))
    write_yaml(out_dir / "config.yaml", cfg.to_dict())
    if env_path is not None:
        write_json(env_path, environment(cfg, engine, argv))
    written = None
    if trace_path is not None:
        from .trace import write_chrome_trace

        written = write_chrome_trace(engine.runtime.timeline(), trace_path, f"asyncbatch {runtime} runtime")
    return CellResult(index, assignment, cfg, result.summary, runtime,
                      any(r.arrival_time > 0 for r in requests), out_dir, written)


def run_experiment(cfg: ExperimentConfig, out_dir: Path, *, argv: Sequence[str] = (), trace: str | None = None,
                   progress: bool = True, echo: Echo = print, host: PluginHost | None = None) -> list[CellResult]:
    """Run every cell of `cfg` (one when there is no sweep) into `out_dir`; returns the cell results."""
    host = host or get_plugin_host()
    cache = ModelCache(host)
    cells = cfg.sweep_cells(host=host)
    if not cfg.sweep:
        path = Path(trace) if trace else (out_dir / "trace.json" if cfg.output.trace else None)
        return [run_cell(0, {}, cfg, cache, out_dir, argv=argv, trace_path=path, progress=progress,
                         env_path=out_dir / "environment.json")]
    write_yaml(out_dir / "config.yaml", cfg.to_dict())
    results: list[CellResult] = []
    for i, (assignment, cell) in enumerate(cells):
        cell_dir = out_dir / "cells" / f"{i:02d}-{_slug(cell_label(assignment, '_'))}"
        path = None
        if trace:
            t = Path(trace)
            path = t.with_name(f"{t.stem}-{i:02d}{t.suffix or '.json'}")
        elif cfg.output.trace:
            path = cell_dir / "trace.json"
        echo(f"cell {i + 1}/{len(cells)}: {cell_label(assignment)}")
        res = run_cell(i, assignment, cell, cache, cell_dir, argv=argv, trace_path=path, progress=progress,
                       env_path=out_dir / "environment.json" if i == 0 else None)
        echo(f"  {res.summary.tokens_per_s:.1f} tok/s, {res.summary.steps} steps, busy "
             f"{fmt(res.summary.compute_busy_fraction, 3)}")
        results.append(res)
    return results


# ---------------------------------------------------------------- sweeps

METRIC_COLUMNS = ("tok_s", "generated_tokens", "wall_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                  "e2e_p50_ms", "e2e_p99_ms", "busy_fraction", "host_ms_step", "compute_ms_step", "steps",
                  "preemptions", "startup_s")


def sweep_row(cell: CellResult) -> dict[str, Any]:
    s = cell.summary
    return {**{k: unstructure(v) for k, v in cell.assignment.items()},
            "tok_s": s.tokens_per_s, "generated_tokens": s.generated_tokens, "wall_s": s.wall_s,
            "ttft_p50_ms": _ms(s.ttft_p50), "ttft_p99_ms": _ms(s.ttft_p99), "itl_p50_ms": _ms(s.itl_p50),
            "itl_p99_ms": _ms(s.itl_p99), "e2e_p50_ms": _ms(s.e2e_p50), "e2e_p99_ms": _ms(s.e2e_p99),
            "busy_fraction": s.compute_busy_fraction, "host_ms_step": s.host_step_ms,
            "compute_ms_step": s.compute_step_ms, "steps": s.steps, "preemptions": s.preemptions,
            "startup_s": s.startup_s}


def write_sweep(out_dir: Path, keys: Sequence[str], cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    rows = [sweep_row(c) for c in cells]
    write_json(out_dir / "sweep.json", {"keys": list(keys), "runtime": cells[0].runtime if cells else None,
                                        "online": any(c.online for c in cells), "rows": rows})
    with (out_dir / "sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*keys, *METRIC_COLUMNS])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return rows


def sweep_table(keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    cols = ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
            "busy_fraction", "host_ms_step", "steps", "preemptions")
    headers = [k.split(".")[-1] for k in keys] + ["tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                                                  "e2e p50", "e2e p99", "busy", "host ms/step", "steps", "preempt"]
    body = [[fmt(r[k]) for k in keys]
            + [fmt(r[c], 3) if c == "busy_fraction" and r[c] is not None else r[c] for c in cols] for r in rows]
    return format_table(headers, body) + "\n(latencies in ms)"
