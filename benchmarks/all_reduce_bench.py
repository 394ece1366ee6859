"""GPU micro-benchmark: one all-reduce of a tensor-parallel layer, NCCL against the symmetric-memory one-shots
(torch's `one_shot`, with barriers, and `lamport`, without).

Times each `engine.parallel.all_reduce` choice the way the engine runs it: 16 calls captured in one CUDA graph,
replayed, for the shapes a row-parallel layer produces (rows x hidden, bfloat16). Also checks that every rank
gets the same bits and that each one-shot equals NCCL's sum within bfloat16 rounding. Start it with torchrun:

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
    one_shots = {kind: Reducer(group, kind, torch.bfloat16, torch.device("cuda")) for kind in ("one_shot", "lamport")}
    nccl = Reducer(group, "nccl", torch.bfloat16, torch.device("cuda"))
    rows_out = []
    for hidden in map(int, args.hidden.split(",")):
        for rows in map(int, args.rows.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + rows)
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = nccl(x.clone())
            row = {"rows": rows, "hidden": hidden, "kib": rows * hidden * 2 / 1024,
                   "nccl_us": time_graph(nccl, x.clone())}  # in place, as the engine's NCCL path (values grow)
            for kind, reducer in one_shots.items():
                if rows * hidden * 2 > ONE_SHOT_MAX_BYTES:
                    continue
                for _ in range(4):  # lamport: every slot of the rotation, fresh and reused
                    got = reducer(x)
                gathered = [torch.empty_like(got) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, got, group=group)
                row[f"{kind}_same_bits_on_every_rank"] = all(torch.equal(g, gathered[0]) for g in gathered)
                row[f"{kind}_max_abs_diff_vs_nccl"] = (got.float() - ref.float()).abs().max().item()
                row[f"{kind}_us"] = time_graph(reducer, x)
            rows_out.append(row)
    if rank == 0:
        info = {"device": torch.cuda.get_device_name(), "world": dist.get_world_size(), "torch": torch.__version__,
                "calls_per_graph": CALLS}
        print(f"{info['world']} x {info['device']}: µs per all-reduce (graph-replayed)")
        print("rows | hidden | KiB | nccl µs | one_shot µs | lamport µs | same bits (one_shot, lamport) | "
              "max |diff| vs nccl (one_shot, lamport)")
        nan = float("nan")
        for r in rows_out:
            print(f"{r['rows']} | {r['hidden']} | {r['kib']:.0f} | {r['nccl_us']:.1f} | "
                  f"{r.get('one_shot_us', nan):.1f} | {r.get('lamport_us', nan):.1f} | "
                  f"{r.get('one_shot_same_bits_on_every_rank', '-')}, {r.get('lamport_same_bits_on_every_rank', '-')} | "
                  f"{r.get('one_shot_max_abs_diff_vs_nccl', nan):.3g}, {r.get('lamport_max_abs_diff_vs_nccl', nan):.3g}")
        with open(args.out, "w") as fh:
            json.dump({"info": info, "rows": rows_out}, fh, indent=1)
    dist.barrier()
    os._exit(0)  # NCCL communicators captured in graphs: no teardown (see asyncbatch.parallel.world)


if __name__ == "__main__":
    main()
