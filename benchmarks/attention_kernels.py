"""Decode attention per layer: the Triton backend against Sdpa (and Flash where it runs), at the Llama-3-8B head
shape, with scattered block tables.

Reports the median time (`triton.testing.do_bench`, which flushes L2 between runs), the effective bandwidth on the
K/V bytes a decode step must read, and that bandwidth as a fraction of a device-to-device copy measured in the
same run. `--sweep` also times a small grid of Triton launch configs per point, to pick defaults (about a minute
more, mostly compiling).

    python benchmarks/attention_kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform

import torch

from asyncbatch.core.attention_api import AttentionMetadata
from asyncbatch.core.errors import UnsupportedError
from asyncbatch.strategies.attention.flash import Flash
from asyncbatch.strategies.attention.sdpa import Sdpa
from asyncbatch.strategies.attention.triton_paged import TritonPaged, TritonPagedConfig

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def decode_step(batch: int, context: int, block_size: int, dtype: torch.dtype, gen: torch.Generator,
                dev: str = "cuda"):
    """A pure decode step: every sequence has `context` tokens, the last one new; blocks drawn at random."""
    nb = -(-context // block_size)
    max_blocks = nb + 8  # the table is wider than the context, as in an engine with a larger max length
    num_blocks = batch * nb + 1
    table = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32).view(batch, nb)
    table = torch.cat([table, torch.zeros(batch, max_blocks - nb, dtype=torch.int32)], 1).to(dev)
    pos = torch.full((batch,), context - 1, dtype=torch.int32, device=dev)
    rows = torch.arange(batch, device=dev)
    slots = table[rows, (context - 1) // block_size].long() * block_size + (context - 1) % block_size
    meta = AttentionMetadata(
        positions=pos, slot_mapping=slots, token_seq=rows.to(torch.int32), seq_len=pos + 1,
        query_start=torch.arange(batch + 1, dtype=torch.int32, device=dev), block_table=table, max_query=1,
        kv_blocks=nb, block_size=block_size)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    k_cache = torch.randn(num_blocks, block_size, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    return (q, k, v, k_cache, v_cache), meta


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / ms / 1e6


def time_backend(backend, inputs, meta, rep: int) -> tuple[float, torch.Tensor]:
    import triton.testing

    scale = HEAD_DIM**-0.5
    fn = lambda: backend.forward(*inputs, meta, scale=scale, sliding_window=None)  # noqa: E731
    out = fn()
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3, out


def sweep_configs():
    grid = [(n, 4, s) for n in (32, 64, 128) for s in (2, 3)] + [(64, 8, 2), (128, 8, 3)]
    for block_n, warps, stages in grid:
        yield f"triton[n{block_n},w{warps},s{stages}]", TritonPagedConfig(block_n=block_n, num_warps=warps,
                                                                         num_stages=stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--contexts", default="512,1024")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rep", type=int, default=60, help="milliseconds of timed runs per measurement")
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of Triton launch configs")
    args = ap.parse_args()
    import triton

    dtype = DTYPES[args.dtype]
    device = torch.device("cuda")
    backends = {"sdpa": Sdpa(), "triton": TritonPaged()}  # sdpa first: it is the reference for rel.err
    TritonPaged().check(device, dtype, HEAD_DIM, args.block_size)
    skipped = {}
    if not args.no_flash:
        flash = Flash()
        try:
            flash.check(device, dtype, HEAD_DIM, args.block_size)
            backends["flash"] = flash
        except UnsupportedError as exc:
            skipped["flash"] = str(exc)
    if args.sweep:
        backends.update({name: TritonPaged(cfg) for name, cfg in sweep_configs()})

    copy_gbps = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    results = []
    head = f"{'batch':>5} {'ctx':>5} {'backend':<24} {'us':>9} {'GB/s':>7} {'%copy':>6} {'splits':>6} {'rel.err':>8}"
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s (read+write)")
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    print(head)
    for batch, context in itertools.product(map(int, args.batches.split(",")), map(int, args.contexts.split(","))):
        inputs, meta = decode_step(batch, context, args.block_size, dtype, gen)
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * inputs[3].element_size()
        ref = None
        for name, backend in backends.items():
            us, out = time_backend(backend, inputs, meta, args.rep)
            ref = out.float() if name == "sdpa" else ref
            err = float("nan") if ref is None else ((out.float() - ref).norm() / ref.norm()).item()
            splits = (backend.num_splits(device, batch, KV_HEADS, meta.block_table.shape[1], args.block_size)
                      if isinstance(backend, TritonPaged) else None)
            gbps = kv_bytes / us / 1e3
            row = dict(batch=batch, context=context, backend=name, us=us, gbps=gbps, frac_of_copy=gbps / copy_gbps,
                       splits=splits, kv_bytes=kv_bytes, rel_err_vs_sdpa=err)
            results.append(row)
            print(f"{batch:>5} {context:>5} {name:<24} {us:>9.1f} {gbps:>7.0f} {100 * gbps / copy_gbps:>5.0f}% "
                  f"{splits if splits else '-':>6} {err:>8.1e}")
        del inputs, meta, ref
        torch.cuda.empty_cache()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), dtype=args.dtype, block_size=args.block_size,
                  heads=[Q_HEADS, KV_HEADS, HEAD_DIM], copy_gbps=copy_gbps, skipped=skipped, results=results)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
