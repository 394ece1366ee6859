"""GPU benchmark: asyncbatch engines against transformers' continuous batching and the bandwidth roofline.

One process, one model (Llama-3-8B shape, bf16, random weights). For each engine: tokens/s, mean decode step
time, compute-stream busy fraction from CUDA events over the decode phase, NVML utilisation, share of the
roofline (bytes a decode step must read, weights plus KV, over the device-to-device copy bandwidth measured in
this run), share of the floor (the roofline where the products' FLOPs at the card's measured dense matmul rate
take longer than their weights' bytes, as at batch 256 on an 8B model), peak memory, memory of slots and graphs, host time per step, and whether its tokens equal those of the
reference engine (single/one/eager). A second table scales the default engine over batch sizes.

    python benchmarks/engine_bench.py --out results.json              # engines + batch scaling
    python benchmarks/engine_bench.py --out hf.json --only-hf --hf-new 256
    python benchmarks/engine_bench.py --out hfs.json --engines "" --batches "" --hf-static   # vs hf_static.py
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch
from bench_measures import (  # same directory; decode_gemm_*.py reach these through this module too
    NvmlSampler,
    copy_bandwidth,
    dense_matmul_flops,
    kv_bytes_per_token,
    make_prompts,
    product_flops_per_token,
    query_heads,
    step_floor_s,
    weight_bytes,
)

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.plugins.report import format_table
from asyncbatch.plugins.trace import write_chrome_trace

ENGINES = {
    "single/one/eager": ("single", "one", "eager"),
    "single/one/per_slot": ("single", "one", "per_slot"),
    "double/two/per_slot": ("double", "two", "per_slot"),
    "double/three/per_slot": ("double", "three", "per_slot"),
    "double/three/mixed": ("double", "three", "mixed"),
    "n_slot3/three/per_slot": ({"name": "n_slot", "num_slots": 3}, "three", "per_slot"),
    "double/three/eager": ("double", "three", "eager"),
    "double/three/staged": ("double", "three", "staged"),
}
DEFAULT = "double/three/mixed"
REFERENCE = "single/one/eager"


def run_engine(model, spec, prompts, new_tokens, args, *, trace_path: str | None = None, release: bool = False) -> dict:
    """`release`: hand the model back as it came (not compiled, not fused), for transformers' own paths after it."""
    buffers, streams, graphs = spec
    batch = len(prompts)
    blocks = batch * (-(-(len(prompts[0]) + new_tokens) // args.block_size)) + 64
    cfg = EngineConfig.from_dict({
        "runtime": "cuda", "buffers": buffers, "streams": streams, "graphs": graphs, "attention": args.attention,
        "compile": args.compile, "fuse_projections": args.fuse, "batch_invariant": args.batch_invariant,
        **({"decode_gemm": args.decode_gemm} if args.decode_gemm else {}), **({"pdl": args.pdl} if args.pdl else {}),
        **({"fold_norms": args.fold_norms} if getattr(args, "fold_norms", None) else {}),
        **({"fuse_rotary": args.fuse_rotary} if getattr(args, "fuse_rotary", None) else {}),
        "batch": {"max_tokens": args.max_tokens, "max_seqs": max(batch, 1)},
        "cache": {"num_blocks": blocks, "block_size": args.block_size}})
    gc.collect()
    torch.cuda.empty_cache()
    engine = Engine.from_model(model, cfg)
    kv_total = sum(t.numel() * t.element_size() for t in (*engine.k_cache, *engine.v_cache))
    # Untimed warm-up run: compiles the Triton kernels and captures the decode graph of this batch size.
    engine.run(engine.make_requests(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    engine.warmup(sizes=[batch])
    torch.cuda.synchronize()
    memory = engine.memory_report()
    torch.cuda.reset_peak_memory_stats()
    if trace_path:
        engine.runtime.record_spans = True
        engine.runtime.config = type(engine.runtime.config)(timing=True, trace_copies=True)
    # Fixed lengths: the preset's random weights may sample its EOS id, which would end a request early.
    requests = engine.make_requests(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    with NvmlSampler() as nvml:
        result = engine.run(requests)
    torch.cuda.synchronize()
    steps = result.steps
    decode = {s.batch for s in steps if s.num_seqs == batch and s.num_decode == s.num_seqs}
    spans = [sp for sp in engine.runtime.device_spans() if sp.name == "comp" and sp.batch in decode]
    busy = span = step_ms = None
    if spans:
        busy_s = sum(sp.end - sp.start for sp in spans)
        span = max(sp.end for sp in spans) - min(sp.start for sp in spans)
        busy = busy_s / span if span > 0 else None
        step_ms = span / len(spans) * 1e3
    ctx_mean = len(prompts[0]) + new_tokens / 2
    step_bytes = weight_bytes(model) + batch * ctx_mean * kv_bytes_per_token(engine)
    roofline_ms = step_bytes / args.bandwidth * 1e3
    g = engine.geometry
    floor_ms = step_floor_s(batch, ctx_mean, weight_bytes(model), kv_bytes_per_token(engine),
                            product_flops_per_token(model), 4 * g["layers"] * query_heads(model) * g["head_dim"],
                            args.bandwidth, args.flops) * 1e3 if getattr(args, "flops", None) else None
    decode_steps = [s for s in steps if s.batch in decode]
    out = {
        "tokens_per_s": result.summary.tokens_per_s,
        "wall_s": result.summary.wall_s,
        "decode_step_ms": step_ms,
        "busy_fraction": busy,
        "nvml_util_mean": nvml.mean,
        "roofline_step_ms": roofline_ms,
        "roofline_fraction": roofline_ms / step_ms if step_ms else None,
        "floor_step_ms": floor_ms,
        "floor_fraction": floor_ms / step_ms if step_ms and floor_ms else None,
        "host_ms_per_step": _mean([s.host_s * 1e3 for s in decode_steps]),
        "device_ms_per_step": _mean([s.compute_s * 1e3 for s in decode_steps if s.compute_s is not None]),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "slots_mib": memory["slots"] / 2**20,
        "graphs_mib": memory["graphs"] / 2**20,
        "slots_and_graphs_mib": (memory["slots"] + memory["graphs"]) / 2**20,
        "kv_cache_gib": kv_total / 2**30,
        "graphs": engine.graphs.num_graphs(),
        "compiled": engine.compiled,
        "attention": engine.attention_name,
        "steps": len(steps),
        "tokens": [list(o.token_ids) for o in result.outputs],
    }
    if trace_path:
        write_chrome_trace(engine.runtime.timeline(), trace_path, "asyncbatch cuda")
    if release:
        engine.release()
    del engine, result
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run_transformers(model, prompts, new_tokens: int, use_async: bool) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model.set_attn_implementation("sdpa")
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(use_async_batching=use_async)
    model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, persistent_manager=True)
    torch.cuda.synchronize()
    with NvmlSampler() as nvml:
        t0 = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                   persistent_manager=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if hasattr(model, "destroy_cached_continuous_batching_manager"):
        model.destroy_cached_continuous_batching_manager()
    ordered = [out[k] for k in sorted(out, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    tokens = [list(o.generated_tokens) for o in ordered]
    gc.collect()
    torch.cuda.empty_cache()
    return {"tokens_per_s": sum(map(len, tokens)) / wall, "wall_s": wall, "step_ms": wall / new_tokens * 1e3,
            "nvml_util_mean": nvml.mean, "tokens": tokens}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--engines", default=",".join(n for n in ENGINES if n != "double/three/staged"))
    ap.add_argument("--batches", default="1,8,32,128,256", help="batch sizes for the scaling table ('' = skip)")
    ap.add_argument("--scale-new", type=int, default=1024)
    ap.add_argument("--hf-new", type=int, default=256)
    ap.add_argument("--hf", action="store_true", help="also run transformers generate_batch (sync and async)")
    ap.add_argument("--only-hf", action="store_true")
    ap.add_argument("--hf-static", action="store_true",
                    help="also run transformers generate with a static cache and a compiled forward (--hf-new tokens)")
    ap.add_argument("--trace-dir", default=None, help="write Chrome traces of the --trace-engines runs here")
    ap.add_argument("--trace-engines", default=f"{DEFAULT},{REFERENCE}")
    ap.add_argument("--trace-new", type=int, default=48, help="new tokens per request in a traced run")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", default="auto", choices=["auto", "none", "layers"])
    ap.add_argument("--fuse", default="auto", choices=["auto", "always", "never"],
                    help="engine.fuse_projections (auto: fused on a GPU)")
    ap.add_argument("--batch-invariant", action="store_true", help="engine.batch_invariant: true for every engine")
    ap.add_argument("--decode-gemm", default=None, choices=["auto", "triton", "tma", "torch"],
                    help="engine.decode_gemm (unset: the engine's default)")
    ap.add_argument("--pdl", default=None, choices=["auto", "always", "never"], help="engine.pdl (unset: default)")
    ap.add_argument("--fold-norms", default=None, choices=["auto", "always", "never"],
                    help="engine.fold_norms (unset: default)")
    ap.add_argument("--fuse-rotary", default=None, choices=["auto", "always", "never"],
                    help="engine.fuse_rotary (unset: default)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=2048)
    args = ap.parse_args()

    import transformers

    t0 = time.perf_counter()
    model, _ = build_model(ModelConfig(preset=args.preset, dtype="bfloat16", device="cuda"), get_plugin_host())
    args.bandwidth = copy_bandwidth()
    args.flops = dense_matmul_flops()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "requests": args.requests,
            "prompt": args.prompt, "new": args.new, "copy_bandwidth_GBps": args.bandwidth / 1e9,
            "dense_bf16_TFLOPs": args.flops / 1e12,
            "weight_GB": weight_bytes(model) / 1e9, "build_s": time.perf_counter() - t0, "compile": args.compile}
    print(json.dumps(info), flush=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = make_prompts(args.requests, args.prompt, vocab)
    results: dict = {"info": info, "engines": {}, "scaling": {}, "transformers": {}, "hf_static": {}}

    def save() -> None:
        with open(args.out, "w") as fh:
            json.dump(results, fh)

    # Steps captured in graphs run compiled layers (compile: auto); eager ones do not, and the two round bf16
    # differently. Each engine is compared with the first engine of its kind: single/one/eager (uncompiled)
    # and single/one/per_slot (compiled), both synchronous loops.
    references: dict[bool, tuple[str, list]] = {}
    if not args.only_hf:
        for name in [n for n in args.engines.split(",") if n]:
            t = time.perf_counter()
            trace = f"{args.trace_dir}/trace-{name.replace('/', '-')}.json" if args.trace_dir else None
            r = run_engine(model, ENGINES[name], prompts, args.new, args)
            ref_name, ref_tokens = references.setdefault(r["compiled"], (name, r["tokens"]))
            r["reference"] = ref_name
            r["tokens_equal_reference"] = r["tokens"] == ref_tokens
            results["engines"][name] = r
            print(f"{name}: {_fmt(r['tokens_per_s'], '.0f')} tok/s, step {_fmt(r['decode_step_ms'])} ms, "
                  f"busy {_fmt(r['busy_fraction'], '.4f')}, roofline {_fmt(r['roofline_fraction'], '.3f')} "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
            save()
            if trace and name in args.trace_engines.split(","):
                run_engine(model, ENGINES[name], prompts, args.trace_new, args, trace_path=trace)
        for b in [int(x) for x in args.batches.split(",") if x]:
            r = run_engine(model, ENGINES[DEFAULT], make_prompts(b, args.prompt, vocab, seed=b), args.scale_new, args)
            r.pop("tokens")
            results["scaling"][b] = r
            print(f"batch {b}: {_fmt(r['tokens_per_s'], '.0f')} tok/s, step {_fmt(r['decode_step_ms'])} ms, host "
                  f"{_fmt(r['host_ms_per_step'])} ms, device {_fmt(r['device_ms_per_step'])} ms, busy "
                  f"{_fmt(r['busy_fraction'], '.4f')}, roofline {_fmt(r['roofline_fraction'], '.3f')}", flush=True)
            save()
    if args.hf_static and not args.only_hf:  # the default engine on HF static's very work; the last engine run
        results["hf_static"]["asyncbatch"] = run_engine(model, ENGINES[DEFAULT], prompts, args.hf_new, args,
                                                        release=True)
    if args.hf or args.only_hf:
        for use_async in (False, True):
            name = f"transformers generate_batch async={use_async}"
            r = run_transformers(model, prompts, args.hf_new, use_async)
            ours = results["engines"].get(REFERENCE, {}).get("tokens")
            r["reference"] = REFERENCE
            r["tokens_equal_reference"] = None if ours is None else [t[: args.hf_new] for t in ours] == r["tokens"]
            results["transformers"][name] = r
            print(f"{name}: {r['tokens_per_s']:.0f} tok/s, {r['step_ms']:.1f} ms/step", flush=True)
            save()
    if args.hf_static:
        from hf_static import compare, run_hf_static  # same directory; it needs transformers

        r = run_hf_static(model, prompts, args.hf_new)
        c = results["hf_static"]["comparison"] = compare(r, results["hf_static"].get("asyncbatch", {}), DEFAULT)
        r.update(step_ms=r.get("decode_ms_per_step"), reference=f"{DEFAULT} (same work)",
                 tokens_equal_reference=c["tokens_equal"])
        results["transformers"]["transformers generate static compiled"] = r
        print(c["summary"], flush=True)
        save()
    for r in [*results["engines"].values(), *results["transformers"].values(), *results["hf_static"].values()]:
        if "tokens" in r:
            r["tokens"] = None
    save()
    print_tables(results)


def print_tables(results: dict) -> None:
    head = ("engine", "tok/s", "step ms", "busy", "nvml %", "roofline", "peak GiB", "slots/graphs MiB",
            "host ms", "device ms", "= ref")
    rows = [(n, _fmt(r["tokens_per_s"], ".0f"), _fmt(r["decode_step_ms"]), _fmt(r["busy_fraction"], ".4f"),
             _fmt(r["nvml_util_mean"], ".1f"), _fmt(r["roofline_fraction"], ".3f"), _fmt(r["peak_memory_gib"]),
             f"{_fmt(r['slots_mib'], '.2f')}/{_fmt(r['graphs_mib'], '.0f')}", _fmt(r["host_ms_per_step"]), _fmt(r["device_ms_per_step"]),
             str(r["tokens_equal_reference"])) for n, r in results["engines"].items()]
    rows += [(n, _fmt(r.get("tokens_per_s"), ".0f"), _fmt(r.get("step_ms")), "-", _fmt(r.get("nvml_util_mean"), ".1f"),
              "-", "-", "-", "-", "-", str(r.get("tokens_equal_reference"))) for n, r in results["transformers"].items()]
    _table(head, rows)
    if "comparison" in results.get("hf_static", {}):
        print(results["hf_static"]["comparison"]["summary"] + "\n")
    if results["scaling"]:
        head = ("batch", "tok/s", "step ms", "host ms", "device ms", "busy", "roofline", "floor ms", "of floor")
        _table(head, [(str(b), _fmt(r["tokens_per_s"], ".0f"), _fmt(r["decode_step_ms"]),
                       _fmt(r["host_ms_per_step"]), _fmt(r["device_ms_per_step"]), _fmt(r["busy_fraction"], ".4f"),
                       _fmt(r["roofline_fraction"], ".3f"), _fmt(r.get("floor_step_ms")),
                       _fmt(r.get("floor_fraction"), ".3f")) for b, r in results["scaling"].items()])


def _table(head, rows) -> None:
    print(format_table(head, rows) + "\n")


if __name__ == "__main__":
    main()
