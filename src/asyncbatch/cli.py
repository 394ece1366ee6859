"""The `asyncbatch` command line: its commands and flags, and how errors become exit codes. What each command does
is in `cli_commands.py`: run YAML experiments and sweeps, compare results, list components, run the simulation
study, serve, load-test a server.

Exit codes: 0 success; 2 a configuration or usage error (reported before any model is built); 1 any other
asyncbatch error (e.g. a feature this machine cannot provide, or a run in which every request failed), or an
internal error (a bug: reported in one line, with the traceback at `--log-level debug`); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .cli_commands import PROG, cmd_bench_serve, cmd_compare, cmd_list, cmd_run, cmd_serve, cmd_simulate
from .logs import setup_logging

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
    run.add_argument("--out", metavar="DIR", help="output directory (default: output.dir/<name>-<timestamp>); "
                                                  "refused if it exists and is not empty, unless --force")
    run.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    run.add_argument("--trace", metavar="PATH", help="write a Chrome/Perfetto trace of host phases and streams")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--nproc", type=int, metavar="N", help="processes in all, one per device: data-parallel "
                                                            "replicas of engine.parallel.tensor ranks each")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list registered components and their config fields")
    lst.add_argument("--family", metavar="F", help="only this family (scheduler, buffer_policy, ...)")
    lst.set_defaults(func=cmd_list)

    cmp = sub.add_parser(
        "compare", help="compare two run or sweep result directories, metric by metric",
        description="Print the metrics of A and B side by side with B - A and B / A (sweeps: cells matched by "
                    "assignment; with replicates, means) and write compare.json, compare.csv and compare.png.")
    cmp.add_argument("a", metavar="A", help="a run directory (results.json) or a sweep directory (sweep.json)")
    cmp.add_argument("b", metavar="B", help="the same for the other side")
    cmp.add_argument("--out", metavar="DIR", help="output directory (default: ./compare-<timestamp>); refused if it "
                                                  "exists and is not empty, unless --force")
    cmp.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    cmp.set_defaults(func=cmd_compare)

    sim = sub.add_parser(
        "simulate", help="virtual GPU busy fraction of every pipeline combination for given per-step costs",
        description="Run every buffers x streams x graphs combination (default: slots 1,2,3 x one,two,three x "
                    "eager,per_slot) on the sim runtime with a cost model; print the busy fraction over the whole "
                    "run and in steady state next to the analytic values. Any registered component may be named, "
                    "plugins' included. Host cpu time is split 75%% prep / 25%% update; launch cost is charged on "
                    "top of it. Flags override the file's `simulate:` mapping.")
    sim.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                     help="a file with a `simulate:` mapping (e.g. configs/simulate.yaml); default: built-in values")
    sim.add_argument("--gpu-ms", type=float, help="compute time per step (default 28)")
    sim.add_argument("--cpu-ms", type=float,
                     help="host work per step besides the launch: schedule, prepare, update (default 8.3)")
    sim.add_argument("--launch-eager-ms", type=float, help="launch cost of an eager step (default 0.5)")
    sim.add_argument("--launch-graph-ms", type=float, help="launch cost of a graph replay (default 0.05)")
    sim.add_argument("--h2d-ms", type=float, help="host-to-device copy per step (default 0.05)")
    sim.add_argument("--d2h-ms", type=float, help="device-to-host copy per step (default 0.02)")
    sim.add_argument("--steps", type=int, help="horizon: tokens per request = steps per combination (default 96)")
    sim.add_argument("--requests", type=int, help="requests, all in one batch (default 8)")
    sim.add_argument("--prompt-len", type=int, help="prompt tokens per request (default 4)")
    sim.add_argument("--slots", metavar="N,...", help="buffer axis as slot counts: 1 single, 2 double, k n_slot(k) "
                                                      "(default 1,2,3 unless --buffers or the file gives buffers)")
    sim.add_argument("--buffers", metavar="NAME,...", help="buffer policies by name, added to --slots; "
                                                           "parameters as name:key=value, or a YAML list [...]")
    sim.add_argument("--streams", metavar="NAME,...", help="stream topologies (default one,two,three)")
    sim.add_argument("--graphs", metavar="NAME,...", help="graph policies (default eager,per_slot)")
    sim.add_argument("--scheduler", metavar="NAME", help="scheduler, name or name:key=value (default fifo)")
    sim.add_argument("--out", metavar="PATH", help="also write the results as JSON")
    sim.set_defaults(func=cmd_simulate)

    srv = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (completions, chat, metrics)",
        description="Serve the engine of an experiment file (only its `engine` section is used) over HTTP: "
                    "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. Requests join the "
                    "running batch between steps. Ctrl-C or SIGTERM stops it gracefully.")
    srv.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                     help="experiment file (default: the embedded configs/default.yaml)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    srv.add_argument("--set", action="append", metavar="dotted.key=value",
                     help="override one config value, e.g. --set engine.serve.max_waiting=64; repeatable")
    srv.set_defaults(func=cmd_serve)

    from .serve.bench_args import configure_parser as bench_serve_flags

    bench = sub.add_parser(
        "bench-serve", help="load-test an OpenAI-compatible completions server (TTFT, TPOT, ITL, goodput)",
        description="Stream /v1/completions requests to a running server on a Poisson or fixed schedule (one run "
                    "per --request-rate), print TTFT, TPOT, ITL and end-to-end latency with throughput and "
                    "goodput, and write results.json, summary.csv, requests.csv and plots (docs/bench-serve.md).")
    bench_serve_flags(bench)
    bench.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: return the code instead of exiting
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    setup_logging(args.log_level)
    code = _dispatch(args, argv)
    world = sys.modules.get("asyncbatch.parallel.world")
    if world is not None and world.exit_skips_teardown():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # NCCL communicators captured in graphs: no teardown (see parallel.world)
    return code


def _dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .core.errors import AsyncBatchError, ConfigError
    from .core.races import RaceError

    try:
        return args.func(args, argv)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return 2
    except RaceError as exc:  # the simulator found races: the whole report, not just its first line
        print(f"{PROG}: error: {exc}\n{exc.report}", file=sys.stderr)
        return 1
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
