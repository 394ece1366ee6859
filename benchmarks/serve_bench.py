"""GPU benchmark: online serving against offline runs, the way users run both, for each engine.

For every engine: `asyncbatch run` on the workload (the offline reference: decode step period at full batch and
host work per step), then `asyncbatch serve` on the same config and `asyncbatch bench-serve` against it at each
request rate, scraping the server's `/metrics` before and after each rate. Per rate it reports the client's
TTFT and TPOT, TPOT over the offline step, and what serving costs the host per step: host work inside the step
loop (against offline), the step loop thread's CPU time, the engine process's CPU time outside that thread, and
the front-end process's CPU time. With `engine.serve.front_end: thread` the HTTP side (JSON, detokenising,
streaming) is in the engine's process and shows as CPU outside the loop; with `process` (the default) it is the
front end's, and the engine's process only hands requests and token batches over.

    python benchmarks/serve_bench.py --out serve.json           # default (both front ends) and synchronous engines
    python benchmarks/serve_bench.py --out s.json --rates 4,inf --new 128 --engines default,default-thread
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
SYNC = ["--set", "engine.buffers=single", "--set", "engine.streams=one"]
THREAD = ["--set", "engine.serve.front_end=thread"]
PIN = ["--set", "engine.serve.cpu_pinning=auto"]
ENGINES = {"default": ([], []), "default-pinned": ([], PIN), "default-thread": ([], THREAD), "sync": (SYNC, []),
           "sync-pinned": (SYNC, PIN), "sync-thread": (SYNC, THREAD)}
TEXT_COLUMNS = ("request_rate", "arrival")  # summary.csv's columns that are not numbers
COUNTERS = ("asyncbatch_steps_total", "asyncbatch_step_host_work_seconds_total",
            "asyncbatch_step_loop_cpu_seconds_total", "asyncbatch_process_cpu_seconds_total",
            "asyncbatch_front_end_cpu_seconds_total", "asyncbatch_step_loop_handover_seconds_total")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.split() and line.split()[0] in COUNTERS}


def offline(config: Path, out: Path, extra: list[str], timeout: float) -> dict:
    done = subprocess.run([sys.executable, "-m", "asyncbatch", "run", str(config), "--no-progress", "--force", "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"offline run failed:\n{done.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    full = max(s["num_seqs"] for s in res["steps"])
    spacing: list[float] = []
    for least in (full, 1):  # decode steps at full batch; any decode steps where a workload never fills it
        steps = [s for s in res["steps"] if s["num_decode"] == s["num_seqs"] >= least]
        spacing = spacing or [b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:])
                              if b["batch"] == a["batch"] + 1]
    s = res["summary"]
    return {"decode_step_ms": statistics.median(spacing) * 1e3, "full_batch": full, "host_step_ms": s["host_step_ms"],
            "tok_s": s["tokens_per_s"], "busy": s["compute_busy_fraction"], "startup_s": s["startup_s"],
            "outside_loop_cpu_ms": s.get("cpu_outside_loop_ms") or 0.0}


def serve_rates(config: Path, work: Path, extra: list[str], rates: list[str], num: int, port: int,
                timeout: float, ref: dict) -> dict:
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")  # noqa: SIM115 (closed when the server ends)
    server = subprocess.Popen([sys.executable, "-m", "asyncbatch", "serve", str(config), "--port", str(port), *extra],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.perf_counter()
    out: dict = {"rates": {}}
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - started > timeout:
                raise SystemExit(f"server did not come up:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        out["startup_s"] = time.perf_counter() - started
        for rate in rates:
            before = scrape(url)
            bench = work / f"rate-{rate}"
            done = subprocess.run([sys.executable, "-m", "asyncbatch", "bench-serve", "--base-url", url, "--workload",
                                   str(config), "--request-rate", rate, "--num-requests", str(num), "--ignore-eos",
                                   "--output", str(bench), "--force", "--no-plots"],
                                  capture_output=True, text=True, timeout=timeout)
            if done.returncode:
                raise SystemExit(f"bench-serve failed:\n{done.stderr[-3000:]}")
            after = scrape(url)
            d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
            steps = max(1.0, d["asyncbatch_steps_total"])
            with open(bench / "summary.csv") as fh:
                row = next(csv.DictReader(fh))
            out["rates"][rate] = {
                "client": {k: v if k in TEXT_COLUMNS or v in ("", "None") else float(v) for k, v in row.items()},
                "steps": d["asyncbatch_steps_total"],
                "host_work_ms_per_step": d["asyncbatch_step_host_work_seconds_total"] / steps * 1e3,
                "step_loop_cpu_ms_per_step": d["asyncbatch_step_loop_cpu_seconds_total"] / steps * 1e3,
                "outside_loop_cpu_ms_per_step": (d["asyncbatch_process_cpu_seconds_total"]
                                                 - d["asyncbatch_step_loop_cpu_seconds_total"]) / steps * 1e3,
                "front_end_cpu_ms_per_step": d["asyncbatch_front_end_cpu_seconds_total"] / steps * 1e3,
                "handover_ms_per_step": d["asyncbatch_step_loop_handover_seconds_total"] / steps * 1e3}
            # What serving costs the engine's host beyond the step: its process's CPU outside the loop beyond what
            # the same threads use offline (torch's, the driver's), plus the loop's own time handing steps over (0
            # with the front end in a thread, whose cost is GIL contention that shows in host work against offline).
            r = out["rates"][rate]
            r["overhead_ms_per_step"] = (max(0.0, r["outside_loop_cpu_ms_per_step"] - ref["outside_loop_cpu_ms"])
                                         + r["handover_ms_per_step"])
            print(rate, json.dumps(out["rates"][rate]), flush=True)
        return out
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        # The engine's own account at exit: hand-over CPU against wall time, the receiver thread, CPU pinning.
        out_log = (work / "server.log").read_text(errors="replace").splitlines()
        out["log"] = [line for line in out_log if "handed" in line or "CPU pinning" in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs/llama3-8b.yaml"))
    ap.add_argument("--engines", default="default,default-thread,sync", help=f"from {', '.join(ENGINES)}")
    ap.add_argument("--rates", default="2,4,8,16,inf")
    ap.add_argument("--num-requests", type=int, default=40, help="requests per rate")
    ap.add_argument("--new", type=int, default=256, help="tokens generated per request (0: the config's lengths)")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.new:
        cfg["workload"]["output_len"] = {"dist": "fixed", "value": args.new}
    config = work / "config.yaml"  # the config both paths read: the workload with `--new` tokens per request
    config.write_text(yaml.safe_dump(cfg))
    results: dict = {"config": cfg, "engines": {}}
    refs: dict[tuple, dict] = {}  # one offline run per engine shape: the front end does not take part in `run`
    for name in args.engines.split(","):
        shape, front = ENGINES[name]
        (work / name).mkdir(exist_ok=True)
        if tuple(shape) not in refs:
            refs[tuple(shape)] = offline(config, work / name / "offline", shape, args.timeout)
        ref = refs[tuple(shape)]
        print(name, "offline", json.dumps(ref), flush=True)
        served = serve_rates(config, work / name, shape + front, args.rates.split(","), args.num_requests, args.port,
                             args.timeout, ref)
        results["engines"][name] = {"offline": ref, "served": served}
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results["engines"])
    for name, e in results["engines"].items():
        for line in e["served"].get("log", []):
            print(name, line.split("] ", 1)[-1])


def print_table(engines: dict) -> None:
    print("engine | rate | req/s | out tok/s | TTFT p50 ms | TPOT p50 ms | TPOT / offline step | host work ms/step "
          "(offline) | loop CPU ms/step | engine CPU outside loop ms/step (offline) | handover ms/step | overhead / "
          "host work (/ offline host work) | front-end CPU ms/step")
    for name, e in engines.items():
        ref = e["offline"]
        for rate, r in e["served"]["rates"].items():
            c = r["client"]
            print(f"{name} | {rate} | {c['request_throughput']:.2f} | {c['output_throughput']:.0f} | "
                  f"{c['ttft_p50_ms']:.1f} | {c['tpot_p50_ms']:.2f} | {c['tpot_p50_ms'] / ref['decode_step_ms']:.3f} | "
                  f"{r['host_work_ms_per_step']:.3f} ({ref['host_step_ms']:.3f}) | "
                  f"{r['step_loop_cpu_ms_per_step']:.3f} | {r['outside_loop_cpu_ms_per_step']:.3f} "
                  f"({ref['outside_loop_cpu_ms']:.3f}) | {r['handover_ms_per_step']:.3f} | "
                  f"{r['overhead_ms_per_step'] / max(1e-9, r['host_work_ms_per_step']):.3f} "
                  f"({r['overhead_ms_per_step'] / max(1e-9, ref['host_step_ms']):.3f}) | "
                  f"{r['front_end_cpu_ms_per_step']:.3f}")


if __name__ == "__main__":
    main()
