"""Where the device time of a decode step goes: kernel time by category, from torch.profiler.

Runs the engine with eager launches (so every kernel is visible to the profiler) over a few decode steps of a
batch, and prints kernel time per step grouped as matrix products, attention, and everything else, plus the top
kernels. Compare with and without `--compile` to see what fusing the small kernels buys.

    python benchmarks/profile_step.py --batch 32 --context 512 [--compile layers] --out profile.json

`--graphs` replays the steps from CUDA graphs as the default engine does (the profiler still sees each kernel of
a replay) and also reports the idle time between consecutive kernels inside a step: the cost of the kernel count,
which a faster kernel does not remove.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch
from step_profiler.asyncbatch_step_profiler import category  # benchmarks/ is on the path
from torch.profiler import ProfilerActivity, profile

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", default="none", choices=["none", "layers"])
    ap.add_argument("--fuse", default="always", choices=["always", "never"], help="fused q/k/v and gate/up")
    ap.add_argument("--batch-invariant", action="store_true", help="engine.batch_invariant: true")
    ap.add_argument("--graphs", action="store_true", help="replay steps from CUDA graphs (graph policy mixed)")
    ap.add_argument("--gap-us", type=float, default=30.0, help="gaps shorter than this are inside a step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, _ = build_model(ModelConfig(preset=args.preset, dtype="bfloat16", device="cuda"), get_plugin_host())
    rng = random.Random(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [[rng.randrange(vocab) for _ in range(args.context)] for _ in range(args.batch)]
    blocks = args.batch * (-(-(args.context + 64) // 16)) + 64
    # Graphs hide kernels from the profiler's per-launch view: profile eager launches of the same kernels, and
    # compare with the graph-replayed step time the engine measures.
    cfg = EngineConfig.from_dict({"runtime": "cuda", "buffers": "double", "streams": "three",
                                  "graphs": "mixed" if args.graphs else "eager",
                                  "compile": args.compile, "batch": {"max_tokens": 4096, "max_seqs": args.batch},
                                  "fuse_projections": args.fuse, "batch_invariant": args.batch_invariant,
                                  "cache": {"num_blocks": blocks, "block_size": 16}})
    engine = Engine.from_model(model, cfg)
    engine.generate(prompts, SamplingParams(max_new_tokens=4))  # compile and warm caches
    engine.generate(prompts, SamplingParams(max_new_tokens=4))

    gaps: dict[int, tuple[float, float, int]] = {}

    def kernels(new_tokens: int) -> tuple[dict, dict]:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            torch.cuda.synchronize()
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
        inside = between = 0.0
        for (_, end), (start, _) in zip(spans, spans[1:]):
            idle = max(0.0, start - end)
            if idle < args.gap_us:
                inside += idle
            else:
                between += idle
        gaps[new_tokens] = (inside, between, len(spans))
        time_us: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        for evt in prof.key_averages():
            if evt.self_device_time_total > 0:
                time_us[evt.key] += evt.self_device_time_total
                count[evt.key] += evt.count
        return time_us, count

    # The prefill (and the first token) alone, then the same plus `steps` decode steps: the difference is decode.
    pre_t, pre_n = kernels(1)
    all_t, all_n = kernels(args.steps + 1)
    steps = args.steps
    per_t = {k: (all_t[k] - pre_t.get(k, 0.0)) / steps for k in all_t}
    per_n = {k: (all_n[k] - pre_n.get(k, 0)) / steps for k in all_n}
    decode = [s for s in engine.last_result.steps if s.num_decode == s.num_seqs]
    measured = sum(s.compute_s for s in decode) / len(decode) * 1e3
    total = sum(per_t.values())
    per_cat: dict[str, float] = defaultdict(float)
    n_cat: dict[str, float] = defaultdict(float)
    for name, us in per_t.items():
        per_cat[category(name)] += us
        n_cat[category(name)] += per_n[name]
    print(f"decode step (batch {args.batch}, context ~{args.context}, compile {args.compile}, fuse {args.fuse}, "
          f"batch_invariant {args.batch_invariant}): kernel time "
          f"{total / 1e3:.2f} ms in {sum(per_n.values()):.0f} kernels; the measured step took "
          f"{measured:.2f} ms ({'graph-replayed' if args.graphs else 'eager-launched'})")
    inside = (gaps[steps + 1][0] - gaps[1][0]) / steps
    between = (gaps[steps + 1][1] - gaps[1][1]) / steps
    print(f"  idle between kernels inside a step {inside / 1e3:.3f} ms per decode step; longer gaps (host, "
          f">= {args.gap_us:g} us) {between / 1e3:.3f} ms")
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:10s} {us / 1e3:6.2f} ms  {100 * us / total:5.1f}%  {n_cat[cat]:6.0f} kernels")
    for name, us in sorted(per_t.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {us:8.1f} us  x{per_n[name]:5.0f}  {category(name):9s} {name[:90]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "per_category_us": per_cat, "kernels_per_category": n_cat,
                       "per_kernel_us": per_t, "per_kernel_count": per_n, "measured_step_ms": measured,
                       "idle_inside_step_us": inside, "idle_between_steps_us": between}, fh)


if __name__ == "__main__":
    main()
