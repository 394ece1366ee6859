"""Mixed prefill+decode benchmark: a seeded ShareGPT-like workload through several engines on one shared model.

Prompt lengths lognormal (median 400, sigma 0.8, 8..3000), output lengths lognormal (median 200, sigma 0.8,
4..1500), all requests at t=0, greedy, EOS ignored. The requests come from the library's own `synthetic`
workload, so `asyncbatch run configs/llama3-8b-mixed.yaml` serves exactly the same ones. Engines are built (and
so warmed up: compile and capture) once each and timed separately; every run is then compared with a floor: per
step, the longer of reading the weights once at the measured copy bandwidth and the step's matmul FLOPs at
`--peak-tflops` (attention and KV reads are left out, so the floor is a lower bound). A second floor adds each
step's KV reads (its sequences' contexts) to the bytes: the roofline of the same steps including the cache. Start-up is comparable only
for the first engine: later ones reuse the compiled layers (in-process, and inductor's on-disk cache of
`engine.startup.compile_cache`) and capture graphs only.

    python benchmarks/mixed_bench.py --out mixed.json                                  # H100/H200, 256 requests
    python benchmarks/mixed_bench.py --out mixed-1000.json --requests 1000
    python benchmarks/mixed_bench.py --out mixed-only.json --engines mixed,sync
    python benchmarks/mixed_bench.py --preset tiny --device cpu --dtype float32 --requests 24 --len-scale 0.05 \\
        --max-tokens 256 --max-seqs 16 --num-blocks 2048 --engines default,sync --out /tmp/mb.json   # CPU check
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import sys
import time

import attrs
import torch
from bench_measures import copy_bandwidth, weight_bytes  # same directory: one definition of both

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.errors import ConfigError
from asyncbatch.core.models import build_model, model_geometry
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.core.stats import percentile
from asyncbatch.plugins.experiment import format_table
from asyncbatch.plugins.workloads import Arrival, LengthDist, Synthetic, SyntheticConfig

# name -> (buffers, streams, graphs). `default` captures whole mixed prefill+decode steps in CUDA graphs (`mixed`);
# `sync` is the synchronous loop with the same kernels; `per_slot` captures mixed steps only up to 512 tokens.
# `one_stream` and `staged` isolate where two engines' bf16 tokens part: copy streams, or per-slot graph sets.
ENGINES = {"default": ("double", "three", "mixed"), "sync": ("single", "one", "mixed"),
           "per_slot": ("double", "three", "per_slot"), "one_stream": ("double", "one", "mixed"),
           "staged": ("double", "three", {"name": "staged", "max_capture_tokens": 4096})}
REFERENCE = "sync"
# Keep in step with configs/llama3-8b-mixed.yaml (the YAML runs the same requests at --len-scale 1).
PROMPT_LEN = LengthDist(dist="lognormal", median=400, sigma=0.8, min=8, max=3000)
OUTPUT_LEN = LengthDist(dist="lognormal", median=200, sigma=0.8, min=4, max=1500)


def scaled(d: LengthDist, k: float) -> LengthDist:
    """The same distribution shrunk by k (CPU checks); at k=1 the very object the YAML describes."""
    if k == 1.0:
        return d
    hi = max(1, round(d.max * k))
    return attrs.evolve(d, median=max(1.0, d.median * k), max=hi, min=min(d.min, hi))


def make_requests(num: int, seed: int, vocab: int, len_scale: float = 1.0) -> list:
    # Synthetic uses config.seed when set, else the experiment seed: both are `seed`, as in the YAML.
    config = SyntheticConfig(num_requests=num, prompt_len=scaled(PROMPT_LEN, len_scale),
                             output_len=scaled(OUTPUT_LEN, len_scale), arrival=Arrival(process="offline"), seed=seed)
    return Synthetic(config, vocab_size=vocab, seed=seed).requests(SamplingParams(temperature=0.0, ignore_eos=True))


def param_counts(model) -> tuple[int, int]:
    """(body, lm_head) parameters that take part in matmuls. The input embedding is only gathered; a tied one
    is the lm_head and counts once."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = emb.data_ptr() == head.data_ptr()
    return total - emb.numel() - (0 if tied else head.numel()), head.numel()


def engine_config(args, spec: tuple) -> EngineConfig:
    buffers, streams, graphs = spec
    return EngineConfig.from_dict({
        "model": {"preset": args.preset, "dtype": args.dtype, "device": args.device}, "runtime": "auto",
        "buffers": buffers, "streams": streams, "graphs": graphs, "attention": args.attention,
        "batch": {"max_tokens": args.max_tokens, "max_seqs": args.max_seqs},
        "cache": {"block_size": args.block_size, "num_blocks": args.num_blocks}})


def step_floor(s, args, kv: bool = False) -> float | None:
    """Lower bound of one step: weights (and with `kv`, the KV cache the step attends over) read once vs matmul
    FLOPs. The lm_head runs only on the sampled rows (one per sequence, `logits_to_keep`), the body on every real
    token."""
    if args.bandwidth is None:
        return None
    flops = 2 * (args.body_params * s.num_tokens + args.head_params * s.num_seqs)
    nbytes = args.weight_bytes + (s.num_context * args.kv_token_bytes if kv else 0)
    return max(nbytes / args.bandwidth, flops / (args.peak_tflops * 1e12))


def ms(values: list[float], q: float) -> float | None:
    v = percentile(values, q)
    return None if v is None else v * 1e3


def metrics(result, args) -> dict:
    outs, steps, sm = result.outputs, result.steps, result.summary
    ttft = [o.ttft for o in outs if o.ttft is not None]
    tpot = [(o.latency - o.ttft) / (len(o.token_ids) - 1) for o in outs if len(o.token_ids) > 1]
    itl = [x for o in outs for x in o.inter_token_latencies]
    e2e = [o.latency for o in outs if o.finish_reason != "error"]
    kinds: dict[str, dict] = {}
    for s in steps:
        # A decode step has one token per sequence; anything else carries prefill (chunks) too.
        key = f"{'decode' if s.num_tokens == s.num_seqs else 'mixed'}/{'graph' if s.graph_replay else 'eager'}"
        k = kinds.setdefault(key, {"steps": 0, "tokens": 0, "padded_tokens": 0, "device_s": None, "timed": 0,
                                   "floor_s": None})
        k["steps"] += 1
        k["tokens"] += s.num_tokens
        k["padded_tokens"] += s.padded_tokens
        if s.compute_s is not None:  # None where the runtime does not time device work
            k["device_s"] = (k["device_s"] or 0.0) + s.compute_s
            k["timed"] += 1
        if (f := step_floor(s, args)) is not None:
            k["floor_s"] = (k["floor_s"] or 0.0) + f
    for k in kinds.values():
        k["device_ms_per_step"] = k["device_s"] / k["timed"] * 1e3 if k["timed"] else None
    floors = [step_floor(s, args) for s in steps]
    floor = sum(floors) if steps and None not in floors else None
    kv_floors = [step_floor(s, args, kv=True) for s in steps]
    kv_floor = sum(kv_floors) if steps and None not in kv_floors else None
    wall = sm.wall_s
    return {
        "wall_s": wall, "requests": sm.num_requests, "generated_tokens": sm.generated_tokens,
        "prompt_tokens": sm.prompt_tokens, "output_tok_s": sm.generated_tokens / wall,
        "total_tok_s": (sm.prompt_tokens + sm.generated_tokens) / wall,
        **{f"{name}_p{q}_ms": ms(xs, q) for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl))
           for q in (50, 90, 99)},
        "e2e_p50_ms": ms(e2e, 50), "e2e_p99_ms": ms(e2e, 99), "steps": len(steps),
        "compute_busy_fraction": sm.compute_busy_fraction, "preemptions": sm.preemptions,
        "finish_reasons": sm.finish_reasons, "step_kinds": dict(sorted(kinds.items())),
        "floor_s": floor, "floor_ratio": floor / wall if floor is not None else None,
        "kv_floor_s": kv_floor, "kv_floor_ratio": kv_floor / wall if kv_floor is not None else None,
    }


def run_engine(name: str, cfg: EngineConfig, model, requests, args) -> tuple[dict, list]:
    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    engine = Engine.from_model(model, cfg)  # warms up here: compile and capture every shape a run can need
    if cuda:
        torch.cuda.synchronize()
    startup_wall = time.perf_counter() - t0
    startup = getattr(engine, "startup_s", None)  # read now: each run hands it to its summary and resets it
    print(f"{name}: startup {startup_wall:.1f} s (engine.startup_s {startup})", flush=True)
    runs = args.repeats + (1 if args.warm_run else 0)  # every run is timed; the last is reported
    walls, first_startup = [], None
    for i in range(runs):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = engine.run(requests)
        walls.append(result.summary.wall_s)
        if i == 0:  # the first run reports the build's warm-up plus any it did itself before its clock started
            first_startup = getattr(result.summary, "startup_s", None)
        print(f"{name}: run {i + 1}/{runs} {walls[-1]:.2f} s", flush=True)
    m = {"buffers": cfg.buffers.name, "streams": cfg.streams.name, "graphs": cfg.graphs.name,
         "startup_wall_s": startup_wall, "startup_s": startup,
         "first_run_startup_s": first_startup, "run_walls_s": walls, "num_graphs": engine.graphs.num_graphs(),
         "compiled": engine.compiled, "attention": engine.attention_name, "memory": engine.memory_report(),
         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
         **metrics(result, args)}
    tokens = [o.token_ids for o in result.outputs]
    # Digests as `asyncbatch run` writes them (results.json outputs[].tokens_sha1): compare with a YAML run.
    m["tokens_sha1"] = [hashlib.sha1(",".join(map(str, t)).encode()).hexdigest()[:16] for t in tokens]
    del engine, result  # free this engine's KV cache and graph pool before the next one is built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return m, tokens


def print_tables(engines: dict) -> None:
    rows = [(n, r["attention"], r["startup_wall_s"], r["startup_s"], r["first_run_startup_s"], r["wall_s"], r["output_tok_s"],
             r["total_tok_s"], r["steps"], r["compute_busy_fraction"], r["preemptions"],
             None if r["equal_to_sync"] is None else f"{r['equal_to_sync']}/{r['requests']}")
            for n, r in engines.items()]
    print(format_table(("engine", "attention", "from_model s", "engine.startup_s", "run1 startup_s", "wall s", "out tok/s",
                        "total tok/s", "steps", "busy", "preempt", "= sync"), rows), end="\n\n")
    cols = [f"{m}_p{q}_ms" for m in ("ttft", "tpot", "itl") for q in (50, 90, 99)] + ["e2e_p50_ms", "e2e_p99_ms"]
    print(format_table(["engine (ms)"] + [c.removesuffix("_ms") for c in cols],
                       [(n, *(r[c] for c in cols)) for n, r in engines.items()]), end="\n\n")
    rows = [(n, kind, k["steps"], k["tokens"], k["padded_tokens"], k["device_s"], k["device_ms_per_step"], k["floor_s"])
            for n, r in engines.items() for kind, k in r["step_kinds"].items()]
    print(format_table(("engine", "kind/graph", "steps", "tokens", "padded", "device s", "device ms/step", "floor s"),
                       rows), end="\n\n")
    print(format_table(("engine", "floor s", "wall s", "floor/wall", "floor+KV s", "floor+KV/wall"),
                       [(n, r["floor_s"], r["wall_s"], r["floor_ratio"], r["kv_floor_s"], r["kv_floor_ratio"])
                        for n, r in engines.items()]), end="\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for everything")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engines", default="default,sync,per_slot", help=f"comma-separated, of: {', '.join(ENGINES)}")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="workload seed (the YAML's workload.seed)")
    ap.add_argument("--len-scale", type=float, default=1.0, help="shrink all lengths (quick CPU checks)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    # 16384 blocks x 16 tokens = 262144 tokens: 32 GiB for the Llama-3-8B shape (128 KiB per token). The
    # 256-request workload needs up to ~110k tokens at once at 128 sequences, so nothing is preempted.
    ap.add_argument("--num-blocks", type=int, default=16384, help="KV blocks, the same for every engine")
    # triton on CUDA: the `mixed` policy captures steps holding prefill chunks only where the attention launch
    # depends on padded counts alone (triton); with flash, auto's first choice, it runs them eagerly. Every
    # engine gets the same backend, so the policies are compared on the same kernels.
    ap.add_argument("--attention", default=None, help="attention backend (default: triton on cuda, auto on cpu)")
    ap.add_argument("--peak-tflops", type=float, default=700.0, help="matmul peak of the floor")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per engine; the last is reported")
    ap.add_argument("--warm-run", action="store_true", help="one extra run per engine first (in run_walls_s only)")
    args = ap.parse_args()

    args.attention = args.attention or ("triton" if args.device == "cuda" else "auto")
    names = [n for n in args.engines.split(",") if n]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        sys.exit(f"unknown engine(s) {unknown}; valid: {', '.join(ENGINES)}")
    configs = {}
    for n in names:  # validate every engine (e.g. a graph policy not registered yet) before the model is built
        try:
            configs[n] = engine_config(args, ENGINES[n])
        except ConfigError as exc:
            sys.exit(f"engine {n!r} ({'/'.join(map(str, ENGINES[n]))}): {exc}")

    import transformers

    t0 = time.perf_counter()
    model, _ = build_model(ModelConfig(preset=args.preset, dtype=args.dtype, device=args.device), get_plugin_host())
    build_s = time.perf_counter() - t0
    cuda = args.device == "cuda"
    args.bandwidth = copy_bandwidth() if cuda else None
    if cuda:
        torch.cuda.empty_cache()  # give the copy buffers back before free memory is read
    args.weight_bytes = weight_bytes(model)
    args.body_params, args.head_params = param_counts(model)
    geo = model_geometry(model)  # what engine.geometry holds; all engines share this model
    args.kv_token_bytes = 2 * geo["layers"] * geo["kv_heads"] * geo["head_dim"] * next(model.parameters()).element_size()
    kv_bytes = 2 * geo["layers"] * args.num_blocks * args.block_size * geo["kv_heads"] * geo["head_dim"] * \
        next(model.parameters()).element_size()
    if cuda and kv_bytes > 0.8 * torch.cuda.mem_get_info()[0]:
        sys.exit(f"--num-blocks {args.num_blocks} needs {kv_bytes / 2**30:.1f} GiB of KV cache; only "
                 f"{torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free: pass a smaller --num-blocks")
    requests = make_requests(args.requests, args.seed, geo["vocab"], args.len_scale)
    info = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv), "args": dict(vars(args)), "build_s": build_s,
            "copy_bandwidth_GBps": args.bandwidth / 1e9 if args.bandwidth else None,
            "weight_GB": args.weight_bytes / 1e9, "kv_cache_GiB": kv_bytes / 2**30,
            "workload": {"prompt_len": attrs.asdict(scaled(PROMPT_LEN, args.len_scale)),
                         "output_len": attrs.asdict(scaled(OUTPUT_LEN, args.len_scale)),
                         "prompt_lens": [len(r.prompt_ids) for r in requests],
                         "output_lens": [r.params.max_new_tokens for r in requests]}}
    print(json.dumps({k: v for k, v in info.items() if k not in ("workload", "args")}), flush=True)
    print(f"{len(requests)} requests: {sum(info['workload']['prompt_lens'])} prompt tokens, "
          f"{sum(info['workload']['output_lens'])} output tokens; KV cache {kv_bytes / 2**30:.2f} GiB", flush=True)

    results: dict = {"info": info, "engines": {}}
    tokens: dict[str, list] = {}
    for n in names:
        results["engines"][n], tokens[n] = run_engine(n, configs[n], model, requests, args)
        with open(args.out, "w") as fh:  # after every engine: a crash later keeps what finished
            json.dump(results, fh, indent=1, default=str)
    # bf16 kernels of different step shapes may round differently, so equality is counted, not required.
    ref = tokens.get(REFERENCE)
    for n, r in results["engines"].items():
        r["equal_to_sync"] = None if ref is None else sum(a == b for a, b in zip(tokens[n], ref))
        # Where each request first parts from the reference: early (a race) or late (rounding drift).
        r["first_diff_vs_sync"] = None if ref is None else [
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(tokens[n], ref)]
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print_tables(results["engines"])


if __name__ == "__main__":
    main()
