"""Decode GEMMs: cuBLAS (`F.linear`) against the Triton GEMM of `asyncbatch.core.invariant_kernels`, at the 8B
shape's projections (fused q/k/v and gate/up) and small M.

Each measurement replays a CUDA graph of `--copies` calls, each on its own copy of the weight (so L2 never serves
a call from the previous one), and reports time per call, the weight bandwidth, and its fraction of a
device-to-device copy measured in the same run. The `invariant` row is the one configuration batch-invariant mode
uses for every shape; the `tN...` rows are candidates for a small-M fast path.

    python benchmarks/gemm_small_m.py --out gemm.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

from asyncbatch.core import invariant_kernels as kernels

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CANDIDATES = {
    "invariant": kernels.INVARIANT,
    "m16n32k128s4": kernels.MatmulConfig(16, 32, 128, 1, 4, 4),
    "m16n64k128s4": kernels.MatmulConfig(16, 64, 128, 1, 4, 4),
    "m16n64k256s3": kernels.MatmulConfig(16, 64, 256, 1, 4, 3),
    "m16n32k256s4": kernels.MatmulConfig(16, 32, 256, 1, 4, 4),
    "m16n64k128s4x2": kernels.MatmulConfig(16, 64, 128, 2, 4, 4),
    "m16n128k128s4x2": kernels.MatmulConfig(16, 128, 128, 2, 4, 4),
    "m32n64k128s4": kernels.MatmulConfig(32, 64, 128, 1, 4, 4),
    "m64n64k64s5": kernels.MatmulConfig(64, 64, 64, 1, 4, 5),
    "m64n32k128s4w8": kernels.MatmulConfig(64, 32, 128, 1, 8, 4),
}


def copy_gbps(nbytes: int = 1 << 30) -> float:
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6


def graph_time_us(fn, copies: int) -> float:
    """Median microseconds per call of `fn(i)` for i < copies, replayed as one CUDA graph."""
    import triton.testing

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median") * 1e3 / copies


def call(kernel: str, x, ws, outs):
    cfg = CANDIDATES.get(kernel)

    def fn(i: int) -> None:
        outs[i] = F.linear(x, ws[i]) if cfg is None else kernels.matmul(x, ws[i], None, cfg)

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,32,256")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CANDIDATES))
    args = ap.parse_args()
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s")
    print(f"{'shape':<8} {'M':>4} {'kernel':<18} {'us':>8} {'GB/s':>6} {'%copy':>6} {'vs cuBLAS':>9} {'max err':>8}")
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(args.copies)]
        for m in map(int, args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            outs = [None] * args.copies
            ref = F.linear(x, ws[0]).float()
            nbytes = n * k * 2 + m * k * 2 + m * n * 2
            base = None
            for kernel in ["cublas", *args.configs.split(",")]:
                fn = call(kernel, x, ws, outs)
                try:
                    us = graph_time_us(fn, args.copies)
                except Exception as exc:  # a config that does not fit this card's shared memory
                    print(f"{name:<8} {m:>4} {kernel:<18} failed: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
                base = base or us
                gbps = nbytes / us / 1e3
                rows.append(dict(shape=name, n=n, k=k, m=m, kernel=kernel, us=us, gbps=gbps, frac=gbps / bw,
                                 vs_cublas=base / us, max_rel_err=err))
                print(f"{name:<8} {m:>4} {kernel:<18} {us:>8.1f} {gbps:>6.0f} {100 * gbps / bw:>5.1f}% "
                      f"{base / us:>8.2f}x {err:>8.1e}")
        ws.clear()
        torch.cuda.empty_cache()
    import triton

    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       python=platform.python_version(), copy_gbps=bw, rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
