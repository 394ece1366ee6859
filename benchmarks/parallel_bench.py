"""GPU benchmark: tensor and data parallelism the way users run them, `asyncbatch run --nproc N`, cold processes.

Each grid point is one `asyncbatch run` of a YAML experiment (model built, compiled and captured by every rank,
then the run). From each results.json: tokens/s, the decode step period at full batch (median spacing of
full-batch decode steps on rank 0's host clock) and its device time, every rank's compute busy fraction, and the
aggregate roofline: the bytes a decode step must read across the group (weights without the embedding table, plus
the KV positions attended), over the group's copy bandwidth (measured here on one card, times the ranks). Scaling
efficiency: TP N is step(TP 1) / step(TP N) / N; DP N is tok/s(DP N) / tok/s(DP 1) / N.

    python benchmarks/parallel_bench.py --out par.json                        # the whole grid, in order
    python benchmarks/parallel_bench.py --out tp.json --runs tp1,tp2,tp4      # some of it
    python benchmarks/parallel_bench.py --out ar.json --runs tp2:nccl,tp2:one_shot   # engine.parallel.all_reduce
    python benchmarks/parallel_bench.py --out h.json --runs tp2:lamport:whole,tp2:lamport  # shard_lm_head

Data parallelism is measured as weak scaling: each replica serves 32 requests at batch 32, so DP 1 is TP 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DECODE = ["--set", "workload.prompt_len={dist: fixed, value: 128}", "--set", "engine.batch.max_seqs=32",
          "--set", "engine.batch.max_tokens=1024", "--set", "engine.cache.memory_fraction=0.8"]


RUNS = {  # name: (label, preset, processes, tensor); data-parallel runs give each replica 32 requests
    "tp1": ("8B TP 1 = DP 1", "llama3-8b", 1, 1), "tp2": ("8B TP 2", "llama3-8b", 2, 2),
    "tp4": ("8B TP 4", "llama3-8b", 4, 4), "dp2": ("8B DP 2", "llama3-8b", 2, 1),
    "dp4": ("8B DP 4", "llama3-8b", 4, 1), "tp4-70b": ("70B TP 4", "llama3-70b", 4, 4),
}


def run_args(name: str, new: int) -> tuple[str, str, int, int, list[str]]:
    """`name` is a key of RUNS, then optionally `:<engine.parallel.all_reduce>` and `:head` or `:whole`
    (`engine.parallel.shard_lm_head` true, the default, or false), as in `tp2:nccl` or `tp4:one_shot:whole`."""
    name, *options = name.split(":")
    if name not in RUNS:
        raise SystemExit(f"unknown run {name!r}: {', '.join(RUNS)}")
    label, preset, procs, tensor = RUNS[name]
    requests = 32 * procs // tensor
    extra = []
    for option in options:
        extra += ["--set", {"head": "engine.parallel.shard_lm_head=true", "whole": "engine.parallel.shard_lm_head=false"}
                  .get(option, f"engine.parallel.all_reduce={option}")]
    return (f"{label} ({', '.join(options)})" if options else label), preset, procs, tensor, [
        "--set", f"engine.parallel.tensor={tensor}", "--set", f"workload.num_requests={requests}", "--set",
        f"workload.output_len={{dist: fixed, value: {new}}}", *extra]


def shape_bytes(preset: str) -> tuple[int, int]:
    """(bytes of weights a decode step reads on one whole model, KV bytes per attended position), bf16."""
    from asyncbatch.core.config import ModelConfig
    from asyncbatch.core.models import preset_config
    from asyncbatch.core.plugin_host import get_plugin_host

    c = preset_config(ModelConfig(preset=preset), get_plugin_host())
    h, f, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    hd = h // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return 2 * (layers * per_layer + v * h + h), 2 * 2 * layers * kv


def summarise(res: dict, procs: int, tensor: int, bw: float, weights: int, kv_pos: int) -> dict:
    steps = [s for s in res["steps"] if s["num_decode"] == s["num_seqs"] == 32]
    spacing = [b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:]) if b["batch"] == a["batch"] + 1]
    period = statistics.median(spacing) if spacing else None
    device = [s["compute_s"] for s in steps if s["compute_s"] is not None]
    ctx = statistics.mean(s["num_context"] for s in steps) if steps else 0
    roof_s = (weights + ctx * kv_pos) / (tensor * bw)  # the group's share of one step, at the group's bandwidth
    ranks = res.get("ranks", [])
    s = res["summary"]
    return {"tok_s": s["tokens_per_s"], "wall_s": s["wall_s"], "startup_s": s["startup_s"],
            "step_ms": period * 1e3 if period else None,
            "device_step_ms": statistics.median(device) * 1e3 if device else None,
            "busy_per_rank": [r["compute_busy_fraction"] for r in ranks] or [s["compute_busy_fraction"]],
            "roofline_step_ms": roof_s * 1e3, "roofline_fraction": roof_s / period if period else None,
            "mean_context": ctx, "processes": procs, "tensor": tensor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="tp1,tp2,tp4,dp2,dp4,tp4-70b", help=f"in order, from {', '.join(RUNS)}")
    ap.add_argument("--new", type=int, default=512, help="tokens generated per request")
    ap.add_argument("--config", default=str(ROOT / "configs/llama3-8b.yaml"))
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    ap.add_argument("--timeout", type=float, default=400)
    args = ap.parse_args()
    import torch
    from bench_measures import copy_bandwidth  # as in the single-GPU tables (this directory)

    bw = copy_bandwidth()

    torch.cuda.empty_cache()  # this process's buffers off card 0 before the ranks size their KV caches
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (one card)", flush=True)
    work = Path(args.out).with_suffix("")
    results: dict = {"bandwidth": bw, "runs": {}}
    for name in args.runs.split(","):
        label, preset, procs, tensor, extra = run_args(name, args.new)
        out = work / label.replace(" ", "_")
        cmd = [sys.executable, "-m", "asyncbatch", "run", args.config, "--no-progress", "--force", "--out",
               str(out), "--nproc", str(procs), "--set", f"engine.model.preset={preset}", *DECODE, *extra,
               *(x for s in args.set for x in ("--set", s))]
        start = time.perf_counter()
        # Its own session: on a timeout the launcher and every rank it started are stopped together.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            err = proc.communicate(timeout=args.timeout * (2 if preset == "llama3-70b" else 1))[0]
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, err = -1, f"timed out after {args.timeout} s\n" + proc.communicate()[0]
        for log in sorted(out.glob("ranks/rank*.log")):
            err += f"\n--- {log.name}\n" + log.read_text(errors="replace")[-2000:]
        row: dict = {"process_s": time.perf_counter() - start, "rc": rc}
        if rc == 0:
            weights, kv_pos = shape_bytes(preset)
            row.update(summarise(json.loads((out / "results.json").read_text()), procs, tensor, bw, weights,
                                 kv_pos))
        else:
            row["error"] = err[-6000:]
        results["runs"][label] = row
        print(label, json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if rc:
            print(row["error"][-1500:], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results["runs"])


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(runs: dict) -> None:
    base = runs.get(RUNS["tp1"][0], {})
    base_tp, base_dp = base.get("step_ms"), base.get("tok_s")
    head = ("run", "tok/s", "step ms", "device ms", "roofline", "scaling", "busy per rank", "startup s")
    print(" | ".join(head))
    for label, r in runs.items():
        if r.get("rc"):
            print(f"{label} | failed (rc {r['rc']})")
            continue
        n = r["processes"]
        scaling = None
        if "8B TP" in label and base_tp and r["step_ms"]:
            scaling = base_tp / r["step_ms"] / r["tensor"]
        if "DP" in label and base_dp:
            scaling = r["tok_s"] / base_dp / n
        busy = " ".join(f"{b:.4f}" if b is not None else "-" for b in r["busy_per_rank"])
        print(" | ".join((label, fmt(r["tok_s"], ".0f"), fmt(r["step_ms"]), fmt(r["device_step_ms"]),
                          fmt(r["roofline_fraction"], ".3f"), fmt(scaling, ".3f"), busy, fmt(r["startup_s"], ".1f"))))


if __name__ == "__main__":
    main()
