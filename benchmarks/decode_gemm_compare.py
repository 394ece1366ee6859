"""The decode GEMM kernels (`engine.decode_gemm`: torch, triton, tma) and `engine.pdl` inside the default engine.

One shared 8B-shaped model (random bf16 weights); every trial is a fresh default engine (`engine_bench.run_engine`:
warm-up, then `batch` x 128-token prompts x `--new` tokens, greedy), dynamo reset before each so that no trial
inherits another's compiled code. The variants run in the order given, then again in reverse, so that a drift of
the card over the call shows as a difference between the two passes rather than between variants.

    python benchmarks/decode_gemm_compare.py --out c.json --batches 1,32 --variants torch/never,tma/never,tma/always
    python benchmarks/decode_gemm_compare.py --out w.json --variants tma/never/w4,tma/never/w2   # attention splits
    python benchmarks/decode_gemm_compare.py --out f.json --variants "tma/never/fuse_cache_write=never,tma/never"
    python benchmarks/decode_gemm_compare.py --out n.json --variants "tma/never/fold=never,tma/never/fold=always"
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_bench as eb  # noqa: E402
from decode_gemm_descent import HALF  # noqa: E402

from asyncbatch.core.config import ModelConfig  # noqa: E402
from asyncbatch.core.models import build_model  # noqa: E402
from asyncbatch.core.plugin_host import get_plugin_host  # noqa: E402


def attention_settings(field: str) -> dict:
    """`w2` -> {"waves": 2}; `waves=2;fuse_cache_write=never` -> {"waves": 2, "fuse_cache_write": "never"}."""
    if field[:1] == "w" and field[1:].isdigit():
        return {"waves": int(field[1:])}
    settings = {}
    for pair in field.split(";"):
        key, _, value = pair.partition("=")
        settings[key] = value.lower() == "true" if value.lower() in ("true", "false") else \
            int(value) if value.lstrip("-").isdigit() else value
    return settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="torch/never,tma/never,tma/always,triton/always",
                    help="decode_gemm/pdl pairs, comma-separated; further fields: fold=V sets engine.fold_norms, "
                         "rotary=V engine.fuse_rotary, "
                         "anything else runs the triton attention backend with settings: wN for `waves: N`, or "
                         "key=value;key=value (integers, true/false)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--width", choices=("full", "half"), default="full",
                    help="half: one TP 2 rank's heads and MLP features, on one card")
    args = ap.parse_args()
    import transformers
    import triton

    model, _ = build_model(ModelConfig(preset="llama3-8b", dtype="bfloat16", device="cuda",
                                       overrides=HALF if args.width == "half" else {}), get_plugin_host())
    bench = argparse.Namespace(block_size=16, attention="auto", compile="auto", fuse="always", batch_invariant=False,
                               max_tokens=2048, bandwidth=eb.copy_bandwidth(), decode_gemm=None, pdl=None,
                               fold_norms=None, fuse_rotary=None)
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bench.bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}; width {args.width}", flush=True)
    variants = args.variants.split(",")
    rows = []
    for batch in map(int, args.batches.split(",")):
        prompts = eb.make_prompts(batch, 128, model.config.vocab_size)
        for rep, order in enumerate((variants, variants[::-1])):
            for variant in order:
                bench.decode_gemm, bench.pdl, *extra = variant.split("/")
                bench.fold_norms = next((f[5:] for f in extra if f.startswith("fold=")), None)
                bench.fuse_rotary = next((f[7:] for f in extra if f.startswith("rotary=")), None)
                attention = [f for f in extra if not f.startswith(("fold=", "rotary="))]
                bench.attention = {"name": "triton", **attention_settings(attention[0])} if attention else "auto"
                torch._dynamo.reset()
                t0 = time.time()
                r = eb.run_engine(model, ("double", "three", "mixed"), prompts, args.new, bench)
                tokens = r.pop("tokens")
                first = next((row["tokens"] for row in rows if row["batch"] == batch and row["variant"] == variant),
                             None)
                rows.append(dict(batch=batch, variant=variant, rep=rep, **r, tokens=tokens))
                print(f"batch {batch:3d} {variant:14s} pass {rep}: step {r['decode_step_ms']:.3f} ms  roofline "
                      f"{r['roofline_fraction']:.3f}  busy {r['busy_fraction']:.4f}  graphs {r['graphs_mib']:.0f} MiB"
                      f"  same tokens as pass 0: {first is None or first == tokens}  ({time.time() - t0:.0f} s)",
                      flush=True)
    print(f"\n{device}, batch x 128-token prompts x {args.new} new tokens, mean of two passes:")
    print(f"{'batch':>5} {'variant':14} {'step ms':>8} {'roofline':>8} {'vs first':>9}")
    for batch in map(int, args.batches.split(",")):
        base = None
        for variant in variants:
            ms = [r["decode_step_ms"] for r in rows if r["batch"] == batch and r["variant"] == variant]
            mean = sum(ms) / len(ms)
            base = base or mean
            roof = sum(r["roofline_fraction"] for r in rows if r["batch"] == batch and r["variant"] == variant)
            print(f"{batch:>5} {variant:14} {mean:>8.3f} {roof / len(ms):>8.3f} {100 * (mean / base - 1):>+8.1f}%")
    with open(args.out, "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, triton=triton.__version__,
                       transformers=transformers.__version__, python=platform.python_version(), width=args.width,
                       new=args.new, copy_bandwidth=bench.bandwidth, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
