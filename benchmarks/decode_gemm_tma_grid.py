"""The `tma` decode GEMM's launches at the 8B shape's projections, against cuBLAS and the `triton` row kernel.

Each shape alone first: every launch of a small grid (weight rows per program, K chunk, stages, warps, K splits),
timed as a CUDA graph of `--copies` calls on their own weight copies (so L2 never serves a call), with the error
against a float64 product and whether two calls give the same bits. Then a chain of 8 layers (q/k/v, o on the
first 4,096 columns, gate/up, down on the first 14,336), one graph, with cuBLAS, the row kernel, the library's
rule (`decode_gemm_tma.plan`) and the best launch per shape from the grid; us per layer.

    python benchmarks/decode_gemm_tma_grid.py --out grid.json [--rows 32,1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform

import torch
import torch.nn.functional as F
import triton
from gemm_small_m import copy_gbps, graph_time_us  # benchmarks/ is on the path

from asyncbatch.core import decode_gemm_kernels as rows_kernel
from asyncbatch.core import decode_gemm_tma as tma

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILES = [(64, 128, 4, 4), (64, 256, 3, 4), (64, 128, 6, 4), (128, 128, 4, 4), (128, 128, 4, 8), (128, 64, 6, 4),
         (32, 256, 4, 4)]  # (weight rows per program, K chunk, stages, warps)


def plans(n: int, sms: int) -> list[tma.Plan]:
    out = []
    for (bn, bk, stages, warps), splits in itertools.product(TILES, (1, 2, 3, 4, 6, 8)):
        if splits == 1 or triton.cdiv(n, bn) * (splits - 1) < 2 * sms:  # at most ~2 programs per SM from splits
            out.append(tma.Plan(splits, stages, bn, bk, warps))
    return out


def label(p: tma.Plan | None) -> str:
    return "rule" if p is None else f"n{p.block_n}k{p.block_k}s{p.stages}w{p.num_warps}x{p.splits}"


def product(kind: str, x, w, p: tma.Plan | None = None):
    if kind == "cublas":
        return F.linear(x, w)
    if kind == "triton":
        return rows_kernel.matmul(x, w)
    return tma.matmul(x, w, plan_=p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="32,1")
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    bw = copy_gbps()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bw:.0f} GB/s, {sms} SMs; torch {torch.__version__}, triton {triton.__version__}")
    rows, best = [], {}
    for m in map(int, args.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(args.copies)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            exact = x.double() @ ws[0].double().T
            cands = [("cublas", None), ("triton", None), ("tma", None)] + [("tma", p) for p in plans(n, sms)]
            base = None
            for kind, p in cands:
                outs = [None] * args.copies

                def fn(i, kind=kind, p=p, outs=outs, x=x, ws=ws):
                    outs[i] = product(kind, x, ws[i], p)
                try:
                    fn(0)
                    first = outs[0].clone()
                    fn(0)
                    same = torch.equal(first, outs[0])
                    err = ((first.double() - exact).norm() / exact.norm()).item()
                    us = graph_time_us(fn, args.copies)
                except Exception as exc:  # a launch this card cannot fit
                    print(f"{name:8} m{m:<3} {kind} {label(p):18} failed: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                base = base or us
                frac = n * k * 2 / us / 1e3 / bw
                rows.append(dict(shape=name, m=m, kernel=kind, plan=label(p) if kind == "tma" else None, us=us,
                                 frac_of_copy=frac, rel_err=err, same_bits=same))
                if p is not None and ((m, name) not in best or us < best[m, name][0]):
                    best[m, name] = (us, p)
                print(f"{name:8} m{m:<3} {kind:7} {label(p) if kind == 'tma' else '':18} {us:8.2f} us "
                      f"{100 * frac:5.1f}% of copy  {base / us:5.3f}x cuBLAS  err {err:.1e}  same bits {same}")
            ws.clear()
            torch.cuda.empty_cache()
    layers = 8
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(layers)]
               for name, (n, k) in SHAPES.items()}
    chain = {}
    print(f"\n{device}: chain of {layers} layers, us per layer")
    for m in map(int, args.rows.split(",")):
        x0 = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        for variant in ("cublas", "triton", "tma rule", "tma best", "cublas again"):
            def layer_chain(_i=0, variant=variant, m=m, x0=x0):
                h = x0
                for i in range(layers):
                    def mm(a, name, i=i):
                        kind = variant.split()[0] if variant != "cublas again" else "cublas"
                        p = best[m, name][1] if variant == "tma best" else None
                        return product(kind, a, weights[name][i], p)
                    q = mm(h, "qkv")
                    g = mm(mm(q[:, :4096], "o"), "gate_up")
                    h = mm(g[:, :14336], "down")
                return h
            us = graph_time_us(layer_chain, 1) / layers
            chain[f"{variant} m{m}"] = us
            print(f"  rows {m:3d}  {variant:13s} {us:8.2f}")
    with open(args.out, "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, triton=triton.__version__,
                       python=platform.python_version(), copy_gbps=bw, sms=sms, rows=rows, chain_us_per_layer=chain,
                       best={f"{m} {name}": [us, label(p)] for (m, name), (us, p) in best.items()}), f, indent=1)


if __name__ == "__main__":
    main()
