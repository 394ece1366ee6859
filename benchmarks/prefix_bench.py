"""Benchmark: prefix caching (`engine.prefix_cache`) against recomputing every prompt.

One process, one model. Two workloads, each run by the default engine with `prefix_cache` none, blocks and
radix (warm-up before the clock, then one timed run each):

- shared: one system prompt of `--prefix` tokens, then `--requests` questions of `--question` tokens, all at
  t=0, `--new` tokens out each, greedy, EOS ignored;
- unshared: the same lengths with no two prompts alike (the cache's overhead when it never hits).

Per run: wall time, prefill time (the summed step time of steps that hold prefill tokens: device compute time
where the runtime measures it, else the host's step period), TTFT p50, tokens/s, hit rate, and whether the tokens
equal the `none` run's. A table, and JSON with `--out`.

    python benchmarks/prefix_bench.py --out prefix.json                         # GPU: llama3-8b, 1000 x 256
    python benchmarks/prefix_bench.py --preset tiny --device cpu --prefix 64 --requests 16 --question 8 --new 8
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host

CACHES = ("none", "blocks", "radix")


def workloads(args: argparse.Namespace, vocab: int) -> dict[str, list[list[int]]]:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix)]
    shared = [prefix + [rng.randrange(vocab) for _ in range(args.question)] for _ in range(args.requests)]
    unshared = [[rng.randrange(vocab) for _ in range(args.prefix + args.question)] for _ in range(args.requests)]
    return {"shared": shared, "unshared": unshared}


def run(model, prompts: list[list[int]], cache: str, args: argparse.Namespace) -> dict:
    # Every run gets the same KV capacity, enough for all requests at once: sized from free memory, a run would
    # get what the previous engines left, and a smaller cache queues and preempts (other steps, other tokens).
    blocks = args.num_blocks or len(prompts) * -(-(len(max(prompts, key=len)) + args.new) // 16) + 64
    cfg = {"prefix_cache": cache, "batch": {"max_tokens": args.max_tokens, "max_seqs": args.max_seqs},
           "cache": {"block_size": 16, "num_blocks": blocks}}
    if args.device == "cpu":
        cfg["runtime"] = "cpu"
    engine = Engine.from_model(model, EngineConfig.from_dict(cfg))
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    engine.generate(prompts[: min(4, len(prompts))], params)  # sampling paths and allocator warm before the clock
    result = engine.run(engine.make_requests(prompts, params))
    s = result.summary
    steps = result.steps
    period = [b.time_s - a.time_s for a, b in zip(steps, steps[1:])]
    prefill = 0.0
    for i, st in enumerate(steps):
        if st.num_tokens > st.num_decode:  # holds prefill tokens
            prefill += st.compute_s if st.compute_s is not None else (period[i - 1] if i else st.time_s)
    ttfts = [o.ttft for o in result.outputs if o.ttft is not None]
    engine.release()
    del engine
    gc.collect()
    return {"wall_s": s.wall_s, "prefill_s": prefill, "ttft_p50_s": statistics.median(ttfts),
            "tokens_per_s": s.tokens_per_s, "hit_rate": s.prefix_cache_hit_rate,
            "prefill_tokens_saved": s.prefill_tokens_saved, "steps": s.steps,
            "tokens": [o.token_ids for o in result.outputs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--num-blocks", type=int, default=None, help="KV blocks of every run (default: all requests at once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    model, _ = build_model(ModelConfig(preset=args.preset, device=args.device, dtype=args.dtype), get_plugin_host())
    results: dict = {"args": vars(args), "runs": {}}
    for name, prompts in workloads(args, model.config.vocab_size).items():
        base = None
        for cache in CACHES:
            r = run(model, prompts, cache, args)
            tokens = r.pop("tokens")
            base = base or tokens
            r["same_tokens_as_none"] = tokens == base
            results["runs"][f"{name}/{cache}"] = r
            print(name, cache, json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    head = ("workload/cache", "wall s", "prefill s", "TTFT p50 ms", "tok/s", "hit rate", "vs none: prefill", "TTFT",
            "tok/s", "same tokens")
    print(" | ".join(head))
    for key, r in results["runs"].items():
        none = results["runs"][key.split("/")[0] + "/none"]
        print(" | ".join((key, f"{r['wall_s']:.3f}", f"{r['prefill_s']:.3f}", f"{r['ttft_p50_s'] * 1e3:.1f}",
                          f"{r['tokens_per_s']:.0f}", "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}",
                          f"{none['prefill_s'] / r['prefill_s']:.2f}x" if r["prefill_s"] else "-",
                          f"{none['ttft_p50_s'] / r['ttft_p50_s']:.2f}x", f"{r['tokens_per_s'] / none['tokens_per_s']:.3f}",
                          str(r["same_tokens_as_none"]))))


if __name__ == "__main__":
    main()
