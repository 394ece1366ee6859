"""A plugin that profiles a window of full-batch decode steps inside any `asyncbatch run`, on every rank.

`profile_step.py` builds its own engine on one GPU; this one rides along with the command users run, so it sees
tensor-parallel ranks (`--nproc N`), the CLI's start-up and its graph buckets. On the `asyncbatch_step_finished`
hook it counts decode steps whose batch holds at least `STEP_PROFILE_MIN_SEQS` requests, starts torch.profiler
(CUDA activity) at the `STEP_PROFILE_START`-th, stops `STEP_PROFILE_STEPS` later, and writes
`<STEP_PROFILE_OUT>/<STEP_PROFILE_TAG>-rank<R>.json`: kernel time per step by category and kernel, kernel count,
and the idle time between kernels closer than 30 us. The profiler slows each kernel it records a little, so read
shares and counts, not the step time.

It is found through its entry point once this folder is on the path:

    PYTHONPATH=benchmarks/step_profiler STEP_PROFILE_OUT=prof STEP_PROFILE_TAG=tp2 \\
        asyncbatch run configs/llama3-8b.yaml --nproc 2 --set engine.parallel.tensor=2
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncbatch

IDLE_INSIDE_US = 30.0
_state: dict[str, Any] = {"seen": 0, "profiler": None, "compute_ms": []}


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "splitk")):
        return "matmul"
    if any(k in n for k in ("_paged_attn", "_combine_splits", "_cache_write", "attention")):
        return "attention"
    if any(k in n for k in ("nccl", "all_reduce", "allreduce", "allgather", "all_gather", "multimem")):
        return "collective"
    return "other"


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(f"STEP_PROFILE_{name}", default))


@asyncbatch.hookimpl
def asyncbatch_step_finished(stats: Any) -> None:
    if stats.num_decode != stats.num_seqs or stats.num_seqs < _setting("MIN_SEQS", 32):
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():  # CUDA kernels are what it counts
        return
    start, count = _setting("START", 60), _setting("STEPS", 16)
    s = _state
    s["seen"] += 1
    if s["seen"] == start:
        torch.cuda.synchronize()
        s["profiler"] = profile(activities=[ProfilerActivity.CUDA])
        s["profiler"].__enter__()
    elif start < s["seen"] <= start + count:
        if stats.compute_s is not None:
            s["compute_ms"].append(stats.compute_s * 1e3)
        if s["seen"] == start + count:
            torch.cuda.synchronize()
            s["profiler"].__exit__(None, None, None)
            _write(s["profiler"], count, s["compute_ms"])


def _write(prof: Any, steps: int, compute_ms: list[float]) -> None:
    import torch

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    idle = sum(b[0] - a[1] for a, b in zip(spans, spans[1:]) if 0 < b[0] - a[1] < IDLE_INSIDE_US)
    per_us: dict[str, float] = defaultdict(float)
    per_n: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.self_device_time_total > 0:
            per_us[evt.key] += evt.self_device_time_total / steps
            per_n[evt.key] += evt.count / steps
    cat_us: dict[str, float] = defaultdict(float)
    cat_n: dict[str, float] = defaultdict(float)
    for name, us in per_us.items():
        cat_us[category(name)] += us
        cat_n[category(name)] += per_n[name]
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ.get("STEP_PROFILE_OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    top = sorted(((us, per_n[k], category(k), k) for k, us in per_us.items()), reverse=True)[:30]
    (out / f"{os.environ.get('STEP_PROFILE_TAG', 'run')}-rank{rank}.json").write_text(json.dumps({
        "rank": rank, "steps": steps, "kernel_us_per_step": sum(per_us.values()), "idle_us_per_step": idle / steps,
        "kernels_per_step": sum(per_n.values()), "per_category_us": cat_us, "kernels_per_category": cat_n,
        "compute_ms": compute_ms, "top": top}, indent=1))
