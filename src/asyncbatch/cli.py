"""The `asyncbatch` command line: run YAML experiments and sweeps, list components, run the simulation study.

Exit codes: 0 success; 2 a configuration or usage error (reported before any model is built); 1 any other
asyncbatch error (e.g. a feature this machine cannot provide), or an internal error (a bug: reported in one line,
with the traceback at `--log-level debug`); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "asyncbatch"


class _StderrHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is at emit time, so redirected or captured stderr keeps working."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _setup_logging(level: str) -> None:
    log = logging.getLogger("asyncbatch")
    log.setLevel(getattr(logging, level.upper()))
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[asyncbatch] %(message)s"))
        log.addHandler(handler)


def default_config_path() -> Path:
    """The embedded default experiment: packaged `asyncbatch/configs/`, else the source tree's `configs/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs" / "default.yaml", here.parents[1] / "configs" / "default.yaml"):
        if candidate.is_file():
            return candidate
    from .core.errors import ConfigError

    raise ConfigError("CONFIG", "no config file given and no embedded configs/default.yaml found")


# ---------------------------------------------------------------- commands


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .core.config import ExperimentConfig
    from .plugins.experiment import make_out_dir, run_experiment, summary_table, sweep_table, write_sweep

    path = Path(args.config) if args.config else default_config_path()
    # Everything is validated here, sweep cells included, before a model is built or a directory created.
    cfg = ExperimentConfig.from_yaml(path, overrides=args.set or [])
    out_dir = make_out_dir(cfg, args.out)
    progress = not args.no_progress and sys.stderr.isatty()
    cells = len(cfg.sweep_cells()) if cfg.sweep else 1
    print(f"experiment {cfg.name!r} from {path}: {cells} run{'s' if cells > 1 else ''} -> {out_dir}")
    try:
        results = run_experiment(cfg, out_dir, argv=[PROG, *argv], trace=args.trace, progress=progress)
    except BaseException:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run that failed before writing anything leaves no empty result directory behind
        raise
    if not cfg.sweep:
        res = results[0]
        print(summary_table(res.summary, res.runtime))
        print(f"results: {out_dir / 'results.json'}")
        if res.trace is not None:
            print(f"trace: {res.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
        return 0
    keys = list(cfg.sweep)
    rows = write_sweep(out_dir, keys, results)
    print(sweep_table(keys, rows))
    print(f"sweep: {out_dir / 'sweep.csv'}, {out_dir / 'sweep.json'}")
    if cfg.output.plots:
        from .plugins.plots import plot_sweep

        plots = plot_sweep(out_dir, keys, rows, online=any(r.online for r in results))
        if plots:
            print("plots: " + ", ".join(str(p) for p in plots))
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


def _cmd_list(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .core.errors import ConfigError
    from .core.plugin_host import get_plugin_host
    from .core.registry import FAMILIES
    from .plugins.experiment import format_table

    if args.family is not None and args.family not in FAMILIES:
        raise ConfigError("--family", f"unknown family {args.family!r}", list(FAMILIES))
    host = get_plugin_host()
    rows = [(c.family, c.name, c.plugin, _describe(c), _config_fields(c.config_cls))
            for family in ([args.family] if args.family else FAMILIES) for c in host.registry(family)]
    print(format_table(("family", "name", "plugin", "description", "config (defaults)"), rows))
    return 0


def _cmd_simulate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json

    from .plugins.simulate import StudyCosts, run_study, study_json, study_table

    costs = StudyCosts(gpu_ms=args.gpu_ms, cpu_ms=args.cpu_ms, launch_eager_ms=args.launch_eager_ms,
                       launch_graph_ms=args.launch_graph_ms, h2d_ms=args.h2d_ms, d2h_ms=args.d2h_ms, steps=args.steps)
    rows = run_study(costs)
    print(study_table(costs, rows))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(study_json(costs, rows), indent=2) + "\n")
        print(f"written: {out}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Asynchronous continuous batching for transformers "
                                                            "models: experiments, sweeps and pipeline studies.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="asyncbatch log level on stderr (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run a YAML experiment (or sweep)",
                         description="Run a YAML experiment; with a `sweep:` mapping, run every cell of it.")
    run.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                     help="experiment file (default: the embedded configs/default.yaml)")
    run.add_argument("--set", action="append", metavar="dotted.key=value",
                     help="override one config value (YAML syntax), e.g. --set workload.num_requests=8; repeatable")
    run.add_argument("--out", metavar="DIR", help="output directory (default: output.dir/<name>-<timestamp>)")
    run.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace of host phases and streams")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)

    lst = sub.add_parser("list", help="list registered components and their config fields")
    lst.add_argument("--family", metavar="F", help="only this family (scheduler, buffer_policy, ...)")
    lst.set_defaults(func=_cmd_list)

    sim = sub.add_parser(
        "simulate", help="virtual GPU busy fraction of every pipeline combination for given per-step costs",
        description="Run buffers (single, double, n_slot 3) x streams (one, two, three) x graphs (eager, per_slot) "
                    "on the sim runtime with a cost model, and compare with the analytic expectation. Host cpu "
                    "time is split 75% prep / 25% update; launch cost is charged on top of it.")
    sim.add_argument("--gpu-ms", type=float, default=28.0, help="compute time per step (default 28)")
    sim.add_argument("--cpu-ms", type=float, default=8.3,
                     help="host work per step besides the launch: schedule, prepare, update (default 8.3)")
    sim.add_argument("--launch-eager-ms", type=float, default=0.5, help="launch cost of an eager step (default 0.5)")
    sim.add_argument("--launch-graph-ms", type=float, default=0.05, help="launch cost of a graph replay (0.05)")
    sim.add_argument("--h2d-ms", type=float, default=0.05, help="host-to-device copy per step (default 0.05)")
    sim.add_argument("--d2h-ms", type=float, default=0.02, help="device-to-host copy per step (default 0.02)")
    sim.add_argument("--steps", type=int, default=32, help="steps per combination (default 32)")
    sim.add_argument("--out", metavar="PATH", help="also write the results as JSON")
    sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: return the code instead of exiting
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    _setup_logging(args.log_level)
    from .core.errors import AsyncBatchError, ConfigError

    try:
        return args.func(args, argv)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return 2
    except AsyncBatchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a bug: one line, the traceback only when asked for)
        return _internal_error(exc, debug=args.log_level == "debug")


def _internal_error(exc: BaseException, *, debug: bool) -> int:
    """Report an unexpected exception in one line (with the traceback first at `--log-level debug`); exit 1."""
    try:
        text = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001  (an exception whose str() fails)
        text = "<unprintable>"
    line = f"{PROG}: internal error: {type(exc).__name__}" + (f": {text}" if text else "")
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
        print(line, file=sys.stderr)
    else:
        print(f"{line} (rerun with --log-level debug for the traceback)", file=sys.stderr)
    return 1
