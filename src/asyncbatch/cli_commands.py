"""What each `asyncbatch` command does, once `cli.py` has parsed its flags: run an experiment (one process per rank
when it is parallel), compare two results, list the registered components, run the simulation study, serve,
load-test a server.

Each `cmd_*` takes the parsed flags and the argv they came from, and returns the exit code; errors are raised and
`cli.py` turns them into messages and exit codes. Heavy modules are imported inside the command that needs them:
building the parser (for `--help`) imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "asyncbatch"


def default_config_path() -> Path:
    """The embedded default experiment: packaged `asyncbatch/configs/`, else the source tree's `configs/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs" / "default.yaml", here.parents[1] / "configs" / "default.yaml"):
        if candidate.is_file():
            return candidate
    from .core.errors import ConfigError

    raise ConfigError("CONFIG", "no config file given and no embedded configs/default.yaml found")


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .core.config import ExperimentConfig
    from .core.errors import ConfigError
    from .plugins.experiment import run_experiment
    from .plugins.report import every_request_failed
    from .plugins.sweeps import report_text

    path = Path(args.config) if args.config else default_config_path()
    # Everything is validated here, sweep cells included, before a model is built or a directory created.
    cfg = ExperimentConfig.from_yaml(path, overrides=args.set or [])
    if args.nproc is not None:  # processes in all: data-parallel replicas of engine.parallel.tensor ranks each
        tensor = cfg.engine.parallel.tensor
        if args.nproc < 1:
            raise ConfigError("--nproc", f"must be >= 1 (processes in all), got {args.nproc}")
        if args.nproc % tensor:
            raise ConfigError("--nproc", f"{args.nproc} processes cannot hold replicas of engine.parallel.tensor="
                                         f"{tensor} ranks")
        cfg = ExperimentConfig.from_yaml(path, overrides=[*(args.set or []),
                                                          f"engine.parallel.data={args.nproc // tensor}"])
    if args.trace is not None:  # before the run, not after it: a trace that cannot be written must not cost it
        _writable_file(args.trace, "--trace")
    if cfg.engine.parallel.data * cfg.engine.parallel.tensor > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_ranks(cfg, args, argv)
    progress = not args.no_progress and sys.stderr.isatty()
    result = run_experiment(cfg, args.out, force=args.force, argv=[PROG, *argv], trace=args.trace, progress=progress)
    print(report_text(result))
    failed = every_request_failed(result)  # written and reported, but nothing ran: not a success
    if failed:
        print(f"{PROG}: error: {failed}", file=sys.stderr)
        return 1
    return 0


def _launch_ranks(cfg: Any, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start one process per data-parallel replica, all writing to the one output directory chosen here."""
    from .core.plugin_host import get_plugin_host
    from .parallel.launch import launch
    from .parallel.tensor import check_model
    from .plugins.experiment import resolve_out_dir

    p = cfg.engine.parallel
    host = get_plugin_host()
    models: list = []  # each sweep cell's model (the ranks make the same check before they build one)
    for _, cell in cfg.sweep_cells(host=host):
        if cell.engine.model not in models:
            models.append(cell.engine.model)
            check_model(cell.engine.model, p.tensor, host)  # from its config: before a process is spawned
    out = resolve_out_dir(cfg, args.out, force=args.force)
    n = p.data * p.tensor
    print(f"{PROG}: starting {n} ranks (engine.parallel: data {p.data}, tensor {p.tensor}); logs of ranks "
          f"1-{n - 1} in {out}/ranks", file=sys.stderr)
    # --force: this process checked the directory; the rank logs are already in it
    return launch([sys.executable, "-m", "asyncbatch", *argv, "--out", str(out), "--force"], n, log_dir=out / "ranks")


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .plugins.compare import compare, compare_table, load_results, write_compare
    from .plugins.report import checked_out_dir, stamped_dir

    a, b = load_results(args.a), load_results(args.b)  # both checked before anything is written
    out = stamped_dir(".", "compare", "--out") if args.out is None else checked_out_dir(args.out, force=args.force)
    result = compare(a, b)
    print(compare_table(result))
    written = write_compare(out, result)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def _config_fields(config_cls: type | None) -> str:
    """`field=default, ...` with defaults in YAML flow syntax, so they can be pasted into a config."""
    import attrs
    import yaml

    from .core.config import unstructure

    def fmt(value: Any) -> str:
        return yaml.safe_dump(unstructure(value), default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("...").strip()

    if config_cls is None:
        return "-"
    parts = []
    for f in attrs.fields(config_cls):
        if not f.init:
            continue
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        parts.append(f.name if default is attrs.NOTHING else f"{f.name}={fmt(default)}")
    return ", ".join(parts) or "-"


def _describe(component: Any) -> str:
    """The registry keeps a docstring's first line, which may stop mid-sentence: show the first sentence."""
    text = component.description
    doc = (getattr(component.factory, "__doc__", None) or "").strip()
    if text and doc.startswith(text) and not text.endswith("."):
        paragraph = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
        text = paragraph.split(". ")[0].rstrip(".") + "."
    return text or "-"


def _output_width() -> int | None:
    """`COLUMNS` if set, else the terminal's width; None when stdout is not a terminal (one line per row)."""
    import shutil

    if os.environ.get("COLUMNS", "").strip().isdigit():
        return max(40, int(os.environ["COLUMNS"]))
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def cmd_list(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .core.errors import ConfigError
    from .core.plugin_host import get_plugin_host
    from .core.registry import FAMILIES
    from .plugins.environment import entry_point_versions, lifecycle_only_plugins
    from .plugins.report import wrapped_table

    if args.family is not None and args.family not in FAMILIES:
        raise ConfigError("--family", f"unknown family {args.family!r}", list(FAMILIES))
    host = get_plugin_host()
    width = _output_width()
    rows = [(c.family, c.name, c.plugin, _describe(c), _config_fields(c.config_cls))
            for family in ([args.family] if args.family else FAMILIES) for c in host.registry(family)]
    # Too wide for the terminal: each description goes under its row, and the config column wraps.
    print(wrapped_table(("family", "name", "plugin", "description", "config (defaults)"), rows, width, below=3))
    observers = lifecycle_only_plugins(host) if args.family is None else []
    if observers:
        versions = entry_point_versions()
        print("\nplugins with lifecycle hooks only (no components):")
        print(wrapped_table(("plugin", "version", "hooks"), [
            (name, (versions.get(name) or {}).get("version") or "-", ", ".join(hooks)) for name, hooks in observers],
            width))
    return 0


def cmd_simulate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json

    from .core.plugin_host import get_plugin_host
    from .plugins.simulate import run_study, study_json, study_table
    from .plugins.simulate_config import FLAG_KEYS, load_study

    host = get_plugin_host()
    # argparse leaves flags that were not given as None: only given ones override the file.
    flags = {f: getattr(args, f[2:].replace("-", "_")) for f in FLAG_KEYS}
    study = load_study(args.config, {f: v for f, v in flags.items() if v is not None}, host=host)
    out = _writable_file(args.out, "--out") if args.out is not None else None  # before the study, not after
    rows = run_study(study, host=host)
    print(study_table(study, rows))
    if out is not None:
        out.write_text(json.dumps(study_json(study, rows), indent=2) + "\n")
        print(f"written: {out}")
    return 0


def _writable_file(path: str, key: str) -> Path:
    """`path` as a file this command can write (its parent directories made); anything else is a `ConfigError`
    on `key`, raised before the work whose results it would hold."""
    from .core.errors import ConfigError

    if not path:
        raise ConfigError(key, "an empty path: give the file to write")
    out = Path(path)
    if out.is_dir():
        raise ConfigError(key, f"{out} is a directory: give the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"cannot create the directory {out.parent}: {exc.strerror or exc}") from None
    try:
        existed = out.exists()
        with out.open("a"):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        raise ConfigError(key, f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def cmd_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .serve.server import serve

    path = args.config or str(default_config_path())
    return serve(path, host=args.host, port=args.port, overrides=args.set or [], log_level=args.log_level)


def cmd_bench_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .serve.bench import main as bench_main

    return bench_main(args, [PROG, *argv])
