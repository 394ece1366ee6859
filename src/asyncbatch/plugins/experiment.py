"""Running YAML experiments: one run, a sweep of cells, or either repeated, with results on disk.

Every run leaves a directory that explains itself: `results.json` (summary, per-request records with every
token's time, per-step numbers), `config.yaml` (the fully resolved experiment, so `asyncbatch run
<dir>/config.yaml` repeats it) and `environment.json` (versions, platform, device, seeds, plugins, relevant
environment variables, command line). A sweep or a repeated run adds `sweep.csv`/`sweep.json`, with replicates
`aggregate.csv`/`aggregate.json`, plots, and one sub-directory per run under `cells/`.

This module decides the runs (every cell, every repetition, on every process of a parallel run), where they are
written, and what spans them (the index files, plots, the race verdict); `cell_run` does one run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..core.config import ExperimentConfig, cell_key
from ..core.errors import ConfigError, UnsupportedError
from ..core.models import check_model_config
from ..core.plugin_host import PluginHost, get_plugin_host
from ..core.races import RaceError
from ..parallel.world import World, join
from .cell_run import CellResult, ModelCache, results_dict, run_cell
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

# Older code imports these from here.
__all__ = ["CellResult", "ExperimentResult", "ModelCache", "cell_label", "fmt", "format_table", "make_out_dir",
           "results_dict", "run_cell", "run_experiment", "summary_table", "write_json", "write_yaml"]

Echo = Callable[[str], None]


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


# ---------------------------------------------------------------- running


def check_cell_models(cells: list[tuple[dict, ExperimentConfig]], host: PluginHost) -> None:
    """Refuse, before any process starts or directory is made, a cell whose model could not be built (an override
    transformers cannot compute, a checkpoint that is not one) or whose stop tokens lie outside that model's
    vocabulary (every request would fail), instead of failing when the sweep reaches it."""
    vocab: dict[str, int | None] = {}
    for assignment, cell in cells:
        model = cell.engine.model
        try:
            if repr(model) not in vocab:
                config = check_model_config(model, host)
                vocab[repr(model)] = getattr(getattr(config, "text_config", None) or config, "vocab_size", None)
            _check_stop_tokens(cell.sampling.stop_token_ids, vocab[repr(model)])
        except ConfigError as exc:
            if not assignment:
                raise
            raise ConfigError(cell_key(assignment), str(exc)) from exc
        except UnsupportedError as exc:
            if not assignment:
                raise
            raise UnsupportedError(f"{cell_key(assignment)}: {exc}") from exc


def _check_stop_tokens(stop_ids: Sequence[int], vocab: int | None) -> None:
    for token in stop_ids:
        if isinstance(vocab, int) and token >= vocab:
            raise ConfigError("sampling.stop_token_ids", f"stop token {token} is outside the vocabulary [0, {vocab})")


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
