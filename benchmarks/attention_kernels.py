"""Decode attention per layer: the Triton backend against Sdpa (and Flash where it runs), at the Llama-3-8B head
shape, with scattered block tables.

By default each backend is timed the way the engine runs it, inside a CUDA graph: one graph holds
`--graph-calls` back-to-back calls, each on its own layer's K/V cache and inputs (as consecutive layers of a model
are, so the L2 cannot serve one call from another's reads), and the time per call is one replay over that count.
`--no-graph` times one call launched from Python instead, which at small sizes measures the launch (~70 us).

Reports the median time (`triton.testing.do_bench`, which flushes L2 between runs), the effective bandwidth on the
K/V bytes a decode step must read, and that bandwidth as a fraction of a device-to-device copy measured in the
same run. Relative error is against Sdpa's output, or the default Triton's where Sdpa's gathered context does
not fit (column `ref`); Sdpa is not timed past `SDPA_MAX_TOKENS` (batch x context). `--variants` times named
Triton configs next to the default; `--sweep` a small grid of launch configs (about a minute more, compiling).

    python benchmarks/attention_kernels.py --out results.json
    python benchmarks/attention_kernels.py --out v.json --variants "w8:waves=8,s3:num_stages=3,w16s3:waves=16;num_stages=3"
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import typing

import attrs
import torch

from asyncbatch.core.attention_api import AttentionMetadata
from asyncbatch.core.errors import UnsupportedError
from asyncbatch.strategies.attention.flash import Flash
from asyncbatch.strategies.attention.sdpa import Sdpa
from asyncbatch.strategies.attention.triton_paged import TritonPaged, TritonPagedConfig

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_MAX_TOKENS = 256 * 2048  # batch x context past which Sdpa is not timed: it gathers the whole context per call
SCALE = HEAD_DIM**-0.5
INVARIANT = "batch_invariant"
FIELD_TYPES = typing.get_type_hints(TritonPagedConfig)


def decode_step(batch: int, context: int, block_size: int, dtype: torch.dtype, gen: torch.Generator,
                layers: int = 1, dev: str = "cuda"):
    """A pure decode step: every sequence has `context` tokens, the last one new; blocks drawn at random. Returns
    `layers` independent (q, k, v, k_cache, v_cache) sets sharing one block table, as a model's layers do."""
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

    def layer():
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        v = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        k_cache = torch.randn(num_blocks, block_size, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype)
        return q, k, v, k_cache, torch.randn_like(k_cache)

    return [layer() for _ in range(layers)], meta


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / ms / 1e6


def time_graph(fns, rep: int) -> float:
    """Median ms of one replay of a CUDA graph that runs `fns` back to back."""
    import triton.testing

    side = torch.cuda.Stream()  # warm up outside the capture, on a side stream, as PyTorch recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")
    finally:
        torch.cuda.synchronize()
        graph.reset()  # frees the graph's private memory pool before the next backend


def time_backend(backend, layers, meta, rep: int, graph: bool) -> tuple[float, torch.Tensor, str]:
    """(us per call, layer 0's output, how it was timed). Falls back to a Python launch if capture fails."""
    import triton.testing

    fns = [functools.partial(backend.forward, *inputs, meta, scale=SCALE, sliding_window=None) for inputs in layers]
    out = fns[0]()  # eager: compiles the kernels, and is the output rel.err compares
    if graph:
        try:
            return time_graph(fns, rep) / len(fns) * 1e3, out, "graph"
        except Exception as exc:  # noqa: BLE001  (a backend that cannot be captured is still timed, and said so)
            print(f"  {type(backend).__name__}: capture failed ({type(exc).__name__}: {exc}); timing eager launches")
    return triton.testing.do_bench(fns[0], warmup=10, rep=rep, return_mode="median") * 1e3, out, "eager"


def sdpa_reference(inputs, meta) -> torch.Tensor | None:
    """Sdpa's output in float32, or None where its gathered context does not fit in memory."""
    try:
        return Sdpa().forward(*inputs, meta, scale=SCALE, sliding_window=None).float()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def sweep_configs():
    grid = [(n, 4, s) for n in (32, 64, 128) for s in (2, 3)] + [(64, 8, 2), (128, 8, 3)]
    for block_n, warps, stages in grid:
        yield f"triton[n{block_n},w{warps},s{stages}]", TritonPagedConfig(block_n=block_n, num_warps=warps,
                                                                         num_stages=stages)


def _value(text: str) -> int | bool | str:
    """An integer, true/false, or else the text itself (for the config's string fields, which validate it)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def variant_keys() -> list[str]:
    """The config's fields as they are at run time (read from attrs, so fields added later work too), and
    `batch_invariant` where the backend has it as a method rather than a field."""
    keys = [f.name for f in attrs.fields(TritonPagedConfig)]
    return keys + [INVARIANT] if INVARIANT not in keys and hasattr(TritonPaged, "make_batch_invariant") else keys


def build_variant(settings: dict) -> TritonPaged:
    fields = {f.name for f in attrs.fields(TritonPagedConfig)}
    backend = TritonPaged(TritonPagedConfig(**{k: v for k, v in settings.items() if k in fields}))
    if settings.get(INVARIANT) and INVARIANT not in fields:
        backend.make_batch_invariant()
    return backend


def parse_variants(spec: str, taken: tuple[str, ...] = ()) -> dict[str, dict]:
    """`name:key=value;key=value,...` -> {name: {key: value}}, keys from `variant_keys()`, values integers,
    true/false or words; each variant is built once here, so the config's validators reject bad values now."""
    keys = variant_keys()
    variants: dict[str, dict] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, sep, body = (s.strip() for s in item.partition(":"))
        if not sep or not name:
            raise ValueError(f"variant {item!r}: expected name:key=value[;key=value...]")
        if name in variants or name in taken:
            raise ValueError(f"variant {name!r}: the name is already used")
        settings = {}
        for pair in (s.strip() for s in body.split(";")):
            if not pair:
                continue
            key, eq, text = (s.strip() for s in pair.partition("="))
            if key not in keys:
                raise ValueError(f"variant {name!r}: unknown field {key!r}; TritonPagedConfig fields: {', '.join(keys)}")
            if not eq:
                raise ValueError(f"variant {name!r}: {pair!r} has no value (expected {key}=VALUE)")
            settings[key] = _value(text)
            choices = typing.get_args(FIELD_TYPES.get(key))
            if choices and settings[key] not in choices:
                raise ValueError(f"variant {name!r}: {key}: {text!r} is not one of {', '.join(choices)}")
        try:
            build_variant(settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"variant {name!r}: {exc}") from None
        variants[name] = settings
    return variants


def decode_splits(backend, device, batch: int, max_blocks: int, block_size: int) -> int | None:
    """Splits per sequence of a decode step: Triton configs only, 1 where the backend runs batch-invariant."""
    num_splits = getattr(backend, "num_splits", None)
    if num_splits is None:
        return None
    if getattr(backend, "invariant", False) or getattr(getattr(backend, "config", None), INVARIANT, False):
        return 1
    return num_splits(device, batch, KV_HEADS, max_blocks, block_size)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--contexts", default="512,1024,2048,4096")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rep", type=int, default=60, help="milliseconds of timed runs per measurement")
    ap.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                    help="time calls replayed from a CUDA graph, as the engine runs them (--no-graph: launched "
                         "from Python)")
    ap.add_argument("--graph-calls", type=int, default=8,
                    help="calls per graph, each on its own layer's cache; time per call = replay / this")
    ap.add_argument("--no-flash", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of Triton launch configs")
    ap.add_argument("--variants", default="",
                    help="named Triton configs to time next to the default, as name:key=value;key=value,... "
                         f"(keys: {', '.join(variant_keys())}; values: integers, true/false)")
    args = ap.parse_args()
    if args.graph_calls < 1:
        ap.error("--graph-calls must be >= 1")
    try:
        variants = parse_variants(args.variants, taken=("sdpa", "triton", "flash"))
    except ValueError as exc:
        ap.error(f"--variants: {exc}")
    import triton

    dtype = DTYPES[args.dtype]
    device = torch.device("cuda")
    backends = {"sdpa": Sdpa(), "triton": TritonPaged()}  # triton before the rest: the fallback rel.err reference
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
    backends.update({name: build_variant(settings) for name, settings in variants.items()})
    layers_per_point = args.graph_calls if args.graph else 1

    copy_gbps = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    results = []
    head = (f"{'batch':>5} {'ctx':>5} {'backend':<24} {'us':>9} {'GB/s':>7} {'%copy':>6} {'splits':>6} "
            f"{'rel.err':>8} {'ref':>6}")
    timing = f"CUDA graph of {args.graph_calls} calls" if args.graph else "Python launch"
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s (read+write); {timing}")
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    print(head)
    for batch, context in itertools.product(_ints(args.batches), _ints(args.contexts)):
        layers, meta = decode_step(batch, context, args.block_size, dtype, gen, layers_per_point)
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * layers[0][3].element_size()
        ref = sdpa_reference(layers[0], meta)
        ref_name = "sdpa" if ref is not None else "triton"
        for name, backend in backends.items():
            if name == "sdpa" and (batch * context > SDPA_MAX_TOKENS or ref is None):
                why = "sdpa output does not fit" if ref is None else f"batch x context > {SDPA_MAX_TOKENS}"
                results.append(dict(batch=batch, context=context, backend=name, skipped=why))
                print(f"{batch:>5} {context:>5} {name:<24} not timed: {why}")
                continue
            us, out, mode = time_backend(backend, layers, meta, args.rep, args.graph)
            if ref is None and name == "triton":
                ref = out.float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            splits = decode_splits(backend, device, batch, meta.block_table.shape[1], args.block_size)
            gbps = kv_bytes / us / 1e3
            row = dict(batch=batch, context=context, backend=name, us=us, gbps=gbps, frac_of_copy=gbps / copy_gbps,
                       splits=splits, kv_bytes=kv_bytes, rel_err=err, ref=ref_name, timing=mode)
            results.append(row)
            note = "  (eager launch: capture failed)" if args.graph and mode != "graph" else ""
            print(f"{batch:>5} {context:>5} {name:<24} {us:>9.1f} {gbps:>7.0f} {100 * gbps / copy_gbps:>5.0f}% "
                  f"{splits if splits else '-':>6} {err:>8.1e} {ref_name:>6}{note}")
            del out
        del layers, meta, ref
        torch.cuda.empty_cache()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), dtype=args.dtype, block_size=args.block_size,
                  heads=[Q_HEADS, KV_HEADS, HEAD_DIM], timing="graph" if args.graph else "eager",
                  graph_calls=args.graph_calls if args.graph else None, copy_gbps=copy_gbps, skipped=skipped,
                  variants=variants, results=results)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
