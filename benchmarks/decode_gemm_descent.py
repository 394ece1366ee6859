"""Choose the Triton decode GEMM's tiles for one card inside the default engine, by coordinate descent.

Each product kind of a decoder layer (fused q/k/v, o, fused gate/up, down) gets the tile that makes the whole
decode step shortest, one kind at a time, the others held at the best found so far; the library's rule is the
starting point. Every trial is a fresh engine on one shared model (`engine_bench.run_engine`: warm-up, then
`batch` x 128-token prompts x `new` tokens, greedy, PDL on), so a tile is judged beside the kernels it runs
with, not alone. cuBLAS with ordinary launches is timed first and last as the reference.

`--width half` builds the 8B shape with half the heads and half the MLP features: one tensor-parallel rank's
products at TP 2 (the all-reduces aside), on one card.

    python benchmarks/decode_gemm_descent.py --out d.json --width half --budget 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attrs
import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_bench as eb  # noqa: E402

from asyncbatch.core import decode_gemm_kernels as kernels  # noqa: E402
from asyncbatch.core.config import ModelConfig  # noqa: E402
from asyncbatch.core.models import build_model  # noqa: E402
from asyncbatch.core.plugin_host import get_plugin_host  # noqa: E402

T = kernels.Tile
HALF = {"num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 7168}
CANDIDATES = {  # kind: tiles to try (the rule's own is tried first, as the start)
    "gate_up": [T(32, 256, 4, 4), T(128, 128, 8, 3), T(64, 128, 4, 5), T(128, 256, 8, 2)],
    "down": [T(32, 256, 4, 3), T(16, 512, 4, 3), T(16, 128, 4, 6), T(32, 128, 4, 5)],
    "qkv": [T(16, 256, 4, 4), T(32, 128, 4, 4), T(32, 256, 4, 3), T(16, 128, 4, 6)],
    "o": [T(16, 512, 4, 3), T(32, 256, 4, 3), T(16, 128, 4, 6), T(32, 128, 4, 5)],
}


def shapes(config) -> dict[str, tuple[int, int]]:
    """(N, K) of each product kind, projections fused."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv, h, f = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.hidden_size, \
        config.intermediate_size
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * f, h), "down": (h, f)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", choices=("full", "half"), default="full")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=float, default=500, help="seconds; no trial starts after them")
    args = ap.parse_args()
    t_start = time.time()
    overrides = HALF if args.width == "half" else {}
    model, _ = build_model(ModelConfig(preset="llama3-8b", dtype="bfloat16", device="cuda", overrides=overrides),
                           get_plugin_host())
    by_kind = shapes(model.config)
    prompts = eb.make_prompts(args.batch, 128, model.config.vocab_size)
    bench = argparse.Namespace(block_size=16, attention="auto", compile="auto", fuse="always", batch_invariant=False,
                               max_tokens=2048, bandwidth=eb.copy_bandwidth(), decode_gemm=None, pdl=None)
    rule = kernels.tile
    print(f"{torch.cuda.get_device_name()}: copy {bench.bandwidth / 1e12:.2f} TB/s; width {args.width}; "
          f"shapes {by_kind}", flush=True)
    rows = []

    def trial(name: str, chosen: dict | None) -> float:
        def override(m, n, element_size=2, k=None):
            for kind, (kn, kk) in by_kind.items():
                if chosen and (kn, kk) == (n, k) and kind in chosen:
                    return kernels.fit(chosen[kind], m, element_size)
            return rule(m, n, element_size, k=k)
        kernels.tile = override
        bench.decode_gemm, bench.pdl = ("torch", "never") if chosen is None else ("triton", "always")
        try:
            r = eb.run_engine(model, ("double", "three", "mixed"), prompts, args.new, bench)
        except Exception as exc:  # a tile Triton cannot fit on this card: skip it
            print(f"{name:34s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            rows.append(dict(trial=name, failed=str(exc)[:300]))
            return float("inf")
        finally:
            kernels.tile = rule
        step = r["decode_step_ms"]
        rows.append(dict(trial=name, tiles={k: attrs.astuple(v) for k, v in (chosen or {}).items()},
                         **{k: v for k, v in r.items() if k != "tokens"}))
        print(f"{name:34s} step {step:.3f} ms  roofline {r['roofline_fraction']:.3f}  ({time.time() - t_start:.0f} s)",
              flush=True)
        return step

    trial("cublas", None)
    best = {kind: rule(args.batch, n, 2, k=k) for kind, (n, k) in by_kind.items()}
    best_ms = trial("rule", dict(best))
    for kind in ("gate_up", "down", "qkv", "o"):
        if time.time() - t_start > args.budget:
            print(f"budget spent: {kind} and after keep their current tiles")
            break
        for cand in CANDIDATES[kind]:
            if cand == best[kind] or time.time() - t_start > args.budget:
                continue
            ms = trial(f"{kind}={cand.block_n}x{cand.block_k}/w{cand.num_warps}/s{cand.num_stages}",
                       {**best, kind: cand})
            if ms < best_ms:
                best, best_ms = {**best, kind: cand}, ms
    final = trial("best again", dict(best))
    ref = trial("cublas again", None)
    print("best:", {k: attrs.astuple(v) for k, v in best.items()},
          f"{min(best_ms, final):.3f} ms against cuBLAS {ref:.3f}")
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, width=args.width, new=args.new,
                       batch=args.batch, shapes=by_kind, rows=rows,
                       best={k: attrs.astuple(v) for k, v in best.items()}), f,
                  indent=1)


if __name__ == "__main__":
    main()
