"""GPU micro-benchmark: one all-reduce of a tensor-parallel layer, NCCL against the one-shot symmetric-memory path.

Times each `engine.parallel.all_reduce` choice the way the engine runs it: 16 calls captured in one CUDA graph,
replayed, for the shapes a row-parallel layer produces (rows x hidden, bfloat16). Also checks that every rank
gets the same bits and that one-shot equals NCCL's sum within bfloat16 rounding. Start it with torchrun:

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/all_reduce_bench.py --out ar2.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from asyncbatch.parallel.all_reduce import ONE_SHOT_MAX_BYTES, Reducer

CALLS = 16


def time_graph(fn, x: torch.Tensor, replays: int = 20) -> float:
    """µs per call of `fn(x)` replayed from a graph of CALLS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * CALLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="1,32,64,128,256,2048")
    ap.add_argument("--hidden", default="4096,8192")
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    group = dist.new_group(list(range(dist.get_world_size())))
    dist.all_reduce(torch.ones(1, device="cuda"), group=group)
    one_shot = Reducer(group, "one_shot", torch.bfloat16, torch.device("cuda"))
    nccl = Reducer(group, "nccl", torch.bfloat16, torch.device("cuda"))
    rows_out = []
    for hidden in map(int, args.hidden.split(",")):
        for rows in map(int, args.rows.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + rows)
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = nccl(x.clone())
            row = {"rows": rows, "hidden": hidden, "kib": rows * hidden * 2 / 1024,
                   "nccl_us": time_graph(nccl, x.clone())}  # in place, as the engine's NCCL path (values grow)
            if rows * hidden * 2 <= ONE_SHOT_MAX_BYTES:
                got = one_shot(x)
                gathered = [torch.empty_like(got) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, got, group=group)
                row["same_bits_on_every_rank"] = all(torch.equal(g, gathered[0]) for g in gathered)
                row["max_abs_diff_vs_nccl"] = (got.float() - ref.float()).abs().max().item()
                row["one_shot_us"] = time_graph(one_shot, x)
            rows_out.append(row)
    if rank == 0:
        info = {"device": torch.cuda.get_device_name(), "world": dist.get_world_size(), "torch": torch.__version__,
                "calls_per_graph": CALLS}
        print(f"{info['world']} x {info['device']}: µs per all-reduce (graph-replayed)")
        print("rows | hidden | KiB | nccl µs | one_shot µs | same bits | max |diff| vs nccl")
        for r in rows_out:
            print(f"{r['rows']} | {r['hidden']} | {r['kib']:.0f} | {r['nccl_us']:.1f} | "
                  f"{r.get('one_shot_us', float('nan')):.1f} | {r.get('same_bits_on_every_rank', '-')} | "
                  f"{r.get('max_abs_diff_vs_nccl', float('nan')):.3g}")
        with open(args.out, "w") as fh:
            json.dump({"info": info, "rows": rows_out}, fh, indent=1)
    dist.barrier()
    os._exit(0)  # NCCL communicators captured in graphs: no teardown (see asyncbatch.parallel.world)


if __name__ == "__main__":
    main()
