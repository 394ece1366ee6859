"""Where the device time of a decode step goes: kernel time by category, from torch.profiler.

Runs the engine with eager launches (so every kernel is visible to the profiler) over a few decode steps of a
batch, and prints kernel time per step grouped as matrix products, attention, and everything else, plus the top
kernels. Compare with and without `--compile` to see what fusing the small kernels buys.

    python benchmarks/profile_step.py --batch 32 --context 512 [--compile layers] --out profile.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "splitk")):
        return "matmul"
    if any(k in n for k in ("_paged_attn", "_combine_splits", "_cache_write", "attention")):
        return "attention"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", default="none", choices=["none", "layers"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, _ = build_model(ModelConfig(preset=args.preset, dtype="bfloat16", device="cuda"), get_plugin_host())
    rng = random.Random(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [[rng.randrange(vocab) for _ in range(args.context)] for _ in range(args.batch)]
    blocks = args.batch * (-(-(args.context + 64) // 16)) + 64
    cfg = EngineConfig.from_dict({"runtime": "cuda", "buffers": "double", "streams": "three", "graphs": "eager",
                                  "compile": args.compile, "batch": {"max_tokens": 4096, "max_seqs": args.batch},
                                  "cache": {"num_blocks": blocks, "block_size": 16}})
    engine = Engine.from_model(model, cfg)
    engine.generate(prompts, SamplingParams(max_new_tokens=4))  # compile, autotune, warm caches
    engine.generate(prompts, SamplingParams(max_new_tokens=4))
    torch.cuda.synchronize()
    # Prefill is one step of its own; profile it too, then subtract it using the engine's own step list.
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, SamplingParams(max_new_tokens=args.steps + 1))
        torch.cuda.synchronize()
    steps = engine.last_result.steps
    decode = [s for s in steps if s.num_decode == s.num_seqs]
    by_name: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "self_device_time_total", 0) > 0:
            by_name[evt.key] += evt.self_device_time_total
            count[evt.key] += evt.count
    total_us = sum(by_name.values())
    prefill_us = sum((s.compute_s or 0.0) for s in steps if s.num_decode != s.num_seqs) * 1e6
    per_cat: dict[str, float] = defaultdict(float)
    for name, us in by_name.items():
        per_cat[category(name)] += us
    n = max(1, len(decode))
    print(f"{len(decode)} decode steps, {len(steps) - len(decode)} prefill; kernel time {total_us / 1e3:.1f} ms "
          f"(prefill device time {prefill_us / 1e3:.1f} ms); kernels per step ~{sum(count.values()) / len(steps):.0f}")
    decode_us = max(0.0, total_us - prefill_us)
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:10s} {us / 1e3:8.2f} ms total  {100 * us / total_us:5.1f}%")
    print(f"  decode kernel time per step ~{decode_us / n / 1e3:.2f} ms; "
          f"measured decode compute per step {sum(s.compute_s for s in decode) / n * 1e3:.2f} ms")
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    for name, us in top:
        print(f"  {us / 1e3:8.2f} ms  x{count[name]:5d}  {category(name):9s} {name[:90]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "per_category_us": per_cat, "top": top, "decode_steps": len(decode),
                       "decode_compute_ms": [s.compute_s * 1e3 for s in decode]}, fh)


if __name__ == "__main__":
    main()
