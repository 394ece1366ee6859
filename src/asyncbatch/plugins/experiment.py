"""Running YAML experiments: one run, a sweep of cells, or either repeated, with results on disk.

Every run leaves a directory that explains itself: `results.json` (summary, per-request records with every
token's time, per-step numbers), `config.yaml` (the fully resolved experiment, so `asyncbatch run
<dir>/config.yaml` repeats it) and `environment.json` (versions, platform, device, seeds, plugins, relevant
environment variables, command line). A sweep or a repeated run adds `sweep.csv`/`sweep.json`, with replicates
`aggregate.csv`/`aggregate.json`, plots, and one sub-directory per run under `cells/`.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..core.config import ExperimentConfig, ModelConfig, cell_key
from ..core.errors import ConfigError, UnsupportedError
from ..core.models import check_model_config
from ..core.plugin_host import PluginHost, get_plugin_host
from ..core.races import RaceError, RaceReport
from ..core.stats import RunContext, RunSummary
from ..core.types import Request
from ..parallel import tensor as tensor_parallel
from ..parallel.replicas import run_replicated
from ..parallel.world import World, join
from .environment import environment
from .report import (
    cell_label,
    checked_out_dir,
    fmt,
    format_table,
    make_dir,
    slug,
    stamped_dir,
    summary_table,
    write_json,
    write_yaml,
)
from .workloads import checked_requests

# Older code imports these from here.
__all__ = ["CellResult", "ExperimentResult", "ModelCache", "cell_label", "fmt", "format_table", "make_out_dir",
           "results_dict", "run_cell", "run_experiment", "summary_table", "write_json", "write_yaml"]

Echo = Callable[[str], None]


@attrs.frozen
class CellResult:
    """One finished run: a repetition of a sweep cell (the whole experiment when there is no sweep)."""

    index: int
    assignment: dict
    config: ExperimentConfig
    summary: RunSummary
    runtime: str
    online: bool
    out_dir: Path
    trace: Path | None = None
    repetition: int = 0
    races: RaceReport | None = None  # None: not checked; empty: checked and race-free


@attrs.frozen
class ExperimentResult(Sequence):
    """What `run_experiment` did. Indexes and iterates like the list of `CellResult` it used to return."""

    cells: tuple[CellResult, ...]
    out_dir: Path
    keys: tuple[str, ...] = ()
    rows: tuple[dict, ...] = ()  # sweep.json rows; empty for a single run
    aggregate: tuple[dict, ...] | None = None  # aggregate.json rows; None without replicates
    plots: tuple[Path, ...] = ()

    def __getitem__(self, index: Any) -> Any:
        return self.cells[index]

    def __len__(self) -> int:
        return len(self.cells)

    def __iter__(self) -> Iterator[CellResult]:
        return iter(self.cells)


# ---------------------------------------------------------------- files


def resolve_out_dir(cfg: ExperimentConfig, out: str | Path | None, *, force: bool = False) -> Path:
    """`out` as given (refused if it holds files, unless `force`), else `output.dir/<name>-<timestamp>`."""
    return stamped_dir(cfg.output.dir, cfg.name) if out is None else checked_out_dir(out, force=force)


def make_out_dir(cfg: ExperimentConfig, out: str | Path | None, *, force: bool = False) -> Path:
    path = resolve_out_dir(cfg, out, force=force)
    return make_dir(path, "--out" if out is not None else "output.dir")


def _us(t: float) -> float:
    return round(t, 6)  # microseconds: far below any latency measured here, and keeps results.json small


def results_dict(cell_index: int, assignment: dict, cfg: ExperimentConfig, result: Any, runtime: str,
                 repetition: int = 0, ranks: Sequence[Any] = ()) -> dict:
    outputs = [{
        "request_id": o.request_id, "prompt_tokens": len(o.prompt_ids), "output_tokens": len(o.token_ids),
        "finish_reason": o.finish_reason, "error": o.error, "arrival_time": _us(o.arrival_time),
        "finish_time": _us(o.finish_time), "ttft": o.ttft, "latency": o.latency,
        "num_preemptions": o.num_preemptions,
        "cached_tokens": getattr(o, "num_cached_tokens", 0),  # prompt tokens read from the prefix cache
        # When the host learned each token, in seconds since the run started: any latency metric can be recomputed.
        "token_times": [_us(t) for t in o.token_times],
        # A digest, not the tokens: enough to check that a rerun produced the same text.
        "tokens_sha1": hashlib.sha1(",".join(map(str, o.token_ids)).encode()).hexdigest()[:16],
    } for o in result.outputs]
    steps = [{**attrs.asdict(s), "host_s": s.host_s} for s in result.steps]
    return {"name": cfg.name, "cell": cell_index, "repetition": repetition, "assignment": assignment,
            "runtime": runtime, "seeds": {"seed": cfg.seed, "engine": cfg.engine.seed, "model": cfg.engine.model.seed},
            "summary": attrs.asdict(result.summary),
            # null: the runtime does not check for races; otherwise the report (count 0 when there were none)
            "races": result.races.to_dict() if getattr(result, "races", None) is not None else None,
            "outputs": outputs, "steps": steps,
            # data-parallel runs: each replica's own numbers (the summary above is over all of them)
            **({"ranks": [attrs.asdict(r) for r in ranks]} if ranks else {})}


# ---------------------------------------------------------------- running


class ModelCache:
    """Keeps the last built model, so sweep cells with an identical `engine.model` section share it."""

    def __init__(self, host: PluginHost, world: World = World()) -> None:
        self.host = host
        self.world = world  # a tensor-parallel rank builds its shard of the model only
        self.key: ModelConfig | None = None
        self.value: tuple[Any, Any] | None = None

    def get(self, cfg: ModelConfig) -> tuple[Any, Any]:
        from ..core import models  # looked up at call time, so tests can stand in for build_model

        if self.value is None or self.key != cfg:
            self.value = None
            _free_memory()
            tensor_parallel.check_model(cfg, self.world.tensor, self.host)  # what `asyncbatch run` checked first
            on_layer = tensor_parallel.layer_sharder(self.world, cfg.path or cfg.source_preset or "the model")
            self.value = models.build_model(cfg, self.host, **({"on_layer": on_layer} if on_layer else {}))
            if on_layer is not None:
                w = self.world
                tensor_parallel.mark_sharded(self.value[0], w.tensor, group=w.tp_group, rank=w.tp_rank,
                                             shard_head=w.shard_lm_head)
            self.key = cfg
        return self.value


def _free_memory() -> None:
    # The previous engine (and model, if replaced) must be gone, its cached blocks returned to the driver, before
    # the next engine sizes its KV cache from free device memory. Engines hold reference cycles: collect.
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress_bar(enabled: bool, requests: Sequence[Request], label: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # Tokens to come; a request whose max_new_tokens is not a count fails alone when the run starts.
    total = sum(n for r in requests if type(n := r.params.max_new_tokens) is int)
    return tqdm(total=total, unit="tok", desc=label, leave=False, file=sys.stderr, dynamic_ncols=True)


def run_cell(index: int, assignment: dict, cfg: ExperimentConfig, cache: ModelCache, out_dir: Path, *,
             argv: Sequence[str], trace_path: Path | None, progress: bool, env_path: Path | None,
             repetition: int = 0, world: World = World()) -> CellResult:
    """Build the engine (reusing the cached model), run the workload, write the run's files."""
    from ..core.engine import Engine

    _free_memory()
    start = time.perf_counter()
    model, tokenizer = cache.get(cfg.engine.model)
    model_s = time.perf_counter() - start  # zero when an earlier sweep cell built the same model
    show = progress and cfg.output.progress and cfg.engine.startup.progress
    engine_cfg = attrs.evolve(cfg.engine, startup=attrs.evolve(cfg.engine.startup, progress=show))
    if world.tensor > 1:
        tensor_parallel.prepare(model, world)
    engine = Engine.from_model(model, engine_cfg, tokenizer=tokenizer, host=cache.host,
                               agree_kv_blocks=tensor_parallel.kv_blocks_agreement(world))
    # Start-up of this run: building the model, the engine, and every compile and capture before the clock; the
    # summary (and so every hook) reports it.
    engine.startup_s += model_s
    factory = cache.host.registry("workload").get(cfg.workload.name, "workload").factory
    workload = factory(cfg.workload.config, vocab_size=engine.geometry["vocab"], seed=cfg.seed)
    requests = checked_requests(workload.requests(cfg.sampling, tokenizer=engine.tokenizer), cfg.workload.name)
    if world.tensor > 1:
        tensor_parallel.check_requests(requests)
    engine.runtime.record_spans = trace_path is not None
    label = cell_label(assignment)
    bar = _progress_bar(progress and cfg.output.progress, requests, label)
    context = RunContext(config=cfg.to_dict(), cell=index, assignment=dict(assignment), repetition=repetition,
                         out_dir=out_dir, num_requests=len(requests))
    on_token = (lambda ev: ev.token_id >= 0 and bar.update(1)) if bar is not None else None
    ranks: list = []
    try:
        if world.size > 1:
            result, ranks = run_replicated(engine, requests, world, context=context, on_token=on_token)
        else:
            result = engine.run(requests, context=context, on_token=on_token)
    except RaceError as exc:
        if exc.result is None:
            raise  # the run broke (exc.__cause__): there is no complete result to write
        result = exc.result  # written below with its race report; run_experiment fails once every run is done
    finally:
        if bar is not None:
            bar.close()
    runtime = engine.runtime.name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results_dict(index, assignment, cfg, result, runtime, repetition, ranks))
    write_yaml(out_dir / "config.yaml", cfg.to_dict())
    if env_path is not None:
        write_json(env_path, environment(cfg, engine, argv))
    written = None
    if trace_path is not None:
        from .trace import write_chrome_trace

        written = write_chrome_trace(engine.runtime.timeline(), trace_path, f"asyncbatch {runtime} runtime")
    return CellResult(index, assignment, cfg, result.summary, runtime,
                      any(r.arrival_time > 0 for r in requests), out_dir, written, repetition, result.races)


def check_cell_models(cells: list[tuple[dict, ExperimentConfig]], host: PluginHost) -> None:
    """Refuse, before any process starts or directory is made, a cell whose model could not be built (an override
    transformers cannot compute, a checkpoint that is not one), instead of failing when the sweep reaches it."""
    seen: set[str] = set()
    for assignment, cell in cells:
        model = cell.engine.model
        if repr(model) in seen:
            continue
        seen.add(repr(model))
        try:
            check_model_config(model, host)
        except ConfigError as exc:
            if not assignment:
                raise
            raise ConfigError(cell_key(assignment), str(exc)) from exc
        except UnsupportedError as exc:
            if not assignment:
                raise
            raise UnsupportedError(f"{cell_key(assignment)}: {exc}") from exc


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, *, force: bool = False,
                   argv: Sequence[str] = (), trace: str | None = None, progress: bool = True, echo: Echo = print,
                   host: PluginHost | None = None) -> ExperimentResult:
    """Run every cell of `cfg` (one when there is no sweep) `cfg.repeat` times and write every result file.

    `out_dir` None: `output.dir/<name>-<timestamp>`. A given directory that exists and is not empty is refused
    (`ConfigError`) unless `force`. Writes what `asyncbatch run` writes, plots included when `output.plots`."""
    host = host or get_plugin_host()
    cells = cfg.sweep_cells(host=host)
    check_cell_models(cells, host)
    runs = [(i, r) for i in range(len(cells)) for r in range(cfg.repeat)]
    parallel = cfg.engine.parallel
    world = join(parallel.data, parallel.tensor, parallel.timeout_s, cfg.engine.model.device,
                 parallel.all_reduce, shard_lm_head=parallel.shard_lm_head)
    try:
        if not world.is_root:  # every rank runs every cell; rank 0 alone writes, prints and shows progress
            # Nothing of this rank's output is kept: no plots, no trace (recording spans costs host time).
            quiet = attrs.evolve(cfg, output=attrs.evolve(cfg.output, plots=False, trace=False))
            with tempfile.TemporaryDirectory(prefix=f"asyncbatch-rank{world.rank}-") as scratch:
                return _run_all(quiet, cells, runs, Path(scratch) / "out", force=True, argv=argv, trace=None,
                                progress=False, echo=lambda _: None, host=host, world=world)
        return _run_all(cfg, cells, runs, out_dir, force=force, argv=argv, trace=trace, progress=progress,
                        echo=echo, host=host, world=world)
    finally:
        world.close()


def _run_all(cfg: ExperimentConfig, cells: list, runs: list[tuple[int, int]], out_dir: str | Path | None, *,
             force: bool, argv: Sequence[str], trace: str | None, progress: bool, echo: Echo, host: PluginHost,
             world: World) -> ExperimentResult:
    out = resolve_out_dir(cfg, out_dir, force=force)
    created = not out.exists()
    make_dir(out, "--out" if out_dir is not None else "output.dir")
    _drop_stale_index(out)
    echo(f"experiment {cfg.name!r}: {len(runs)} run{'s' if len(runs) > 1 else ''} -> {out}")
    try:
        if not cfg.sweep and cfg.repeat == 1:
            path = Path(trace) if trace else (out / "trace.json" if cfg.output.trace else None)
            cell = run_cell(0, {}, cfg, ModelCache(host, world), out, argv=argv, trace_path=path, progress=progress,
                            env_path=out / "environment.json", world=world)
            result = ExperimentResult((cell,), out)
        else:
            result = _run_many(cfg, cells, runs, out, argv=argv, trace=trace, progress=progress, echo=echo,
                               host=host, world=world)
        _fail_on_races(result)
        return result
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty result directory behind
        raise


#: The files that say what a result directory holds (`asyncbatch compare` reads them); rewritten by every run.
INDEX_FILES = ("results.json", "sweep.json", "sweep.csv", "aggregate.json", "aggregate.csv")


def _drop_stale_index(out: Path) -> None:
    """Remove an earlier experiment's index files from a directory reused with `--force`: the new run writes its
    own, and one it does not write (no aggregate without replicates, no sweep.json for a single run) would
    otherwise describe the directory as the earlier experiment."""
    for name in INDEX_FILES:
        (out / name).unlink(missing_ok=True)


def _fail_on_races(result: ExperimentResult) -> None:
    """Every run is written first (each results.json holds its report under `races`); then a race in any of
    them fails the experiment, naming the runs."""
    racy = [c for c in result if c.races]
    if not racy:
        return
    where = ", ".join(str(c.out_dir / "results.json") for c in racy[:3]) + (" ..." if len(racy) > 3 else "")
    error = RaceError(racy[0].races, result=result)
    error.args = (f"{len(racy)} of {len(result)} run(s) had races (reports in {where}). {error}",)
    raise error


def _run_many(cfg: ExperimentConfig, cells: list, runs: list[tuple[int, int]], out: Path, *, argv: Sequence[str],
              trace: str | None, progress: bool, echo: Echo, host: PluginHost, world: World) -> ExperimentResult:
    from .sweeps import aggregate, write_aggregate, write_sweep

    write_yaml(out / "config.yaml", cfg.to_dict())
    cache = ModelCache(host, world)
    results: list[CellResult] = []
    for n, (i, rep) in enumerate(runs):
        assignment, cell = cells[i]
        tag = {**assignment, "rep": rep} if cfg.repeat > 1 else assignment
        cell_dir = out / "cells" / f"{i:02d}-{slug(cell_label(tag, '_'))}"
        suffix = f"-{i:02d}" + (f"-r{rep}" if cfg.repeat > 1 else "")
        path = None
        if trace:
            t = Path(trace)
            path = t.with_name(f"{t.stem}{suffix}{t.suffix or '.json'}")
        elif cfg.output.trace:
            path = cell_dir / "trace.json"
        where = f"cell {i + 1}/{len(cells)}" + (f" rep {rep + 1}/{cfg.repeat}" if cfg.repeat > 1 else "")
        echo(f"{where}: {cell_label(assignment)}")
        res = run_cell(i, assignment, cell.replica(rep), cache, cell_dir, argv=argv, trace_path=path,
                       progress=progress, env_path=out / "environment.json" if n == 0 else None, repetition=rep,
                       world=world)
        echo(f"  {res.summary.tokens_per_s:.1f} tok/s, {res.summary.steps} steps, busy "
             f"{fmt(res.summary.compute_busy_fraction, 3)}")
        results.append(res)
    keys = cfg.sweep_keys()
    rows = write_sweep(out, keys, results, repeat=cfg.repeat)
    agg = aggregate(keys, rows)
    if agg is not None:
        write_aggregate(out, keys, agg)
    plots: list[Path] = []
    if cfg.output.plots:
        from .plots import plot_sweep

        plots = plot_sweep(out, keys, rows, online=any(r.online for r in results), aggregate=agg, echo=echo)
    return ExperimentResult(tuple(results), out, tuple(keys), tuple(rows), tuple(agg) if agg else None, tuple(plots))
