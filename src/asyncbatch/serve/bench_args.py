"""The command-line flags of `asyncbatch bench-serve`, apart from the code that runs it (`bench`), so that
building the parser costs no imports."""

from __future__ import annotations

import argparse


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The flags of `bench-serve`. cli.build_parser calls this on every start, so this module imports nothing
    heavier than argparse; `bench.BenchOptions.from_args` checks the values."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)")
    p.add_argument("--model", help="model name to request (default: the first one GET /v1/models lists)")
    p.add_argument("--request-rate", default="inf", metavar="R[,R...]",
                   help="requests per second, or inf (all at once); several, comma-separated, sweep them (one row "
                        "each), e.g. 2,4,8,inf (default: inf)")
    p.add_argument("--arrival", default="poisson", choices=("poisson", "fixed"),
                   help="gaps between sends: exponential (poisson) or exactly 1/rate (default: poisson)")
    p.add_argument("--max-concurrency", type=int, metavar="C", help="at most C requests in flight (default: no limit)")
    p.add_argument("--num-requests", type=int, metavar="N", help="requests per rate (default: the workload's count)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workload", metavar="CONFIG.yaml",
                        help="prompt and output lengths from this experiment's workload section (its arrival "
                             "process is ignored: --request-rate schedules)")
    source.add_argument("--dataset", metavar="FILE.jsonl",
                        help='prompts from a JSONL file: {"prompt": "text"} or {"prompt_ids": [...]}, optional '
                             '"max_new_tokens"')
    p.add_argument("--seed", type=int, help="seed of prompts and arrival times (default: the file's, else 0)")
    p.add_argument("--slo", metavar="KEY=MS,...", help="objectives for goodput, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=5000")
    p.add_argument("--output", metavar="DIR", help="output directory (default: results/bench-serve-<timestamp>); "
                                                   "refused if it exists and is not empty, unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty --output directory")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="latency CDFs, histograms and (several rates) rate-vs-latency plots (default: on)")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (a vllm extension) so that every "
                                                             "request generates exactly max_tokens")
    p.add_argument("--vocab-size", type=int, default=512, metavar="V",
                   help="synthetic prompt token ids are drawn below V (default 512 fits every preset)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="a request fails after S seconds without a byte from the server (default 300)")
