"""Micro-benchmark: what it would cost tensor-parallel ranks to receive each step's batch from rank 0.

asyncbatch's ranks each schedule and prepare the same batch from the same requests instead (no collective per
step; see Concepts, tensor parallelism). The alternative the design was weighed against is rank 0 preparing the
packed step inputs and sending them: over gloo to the other ranks' hosts (which also need the batch to update
their requests), or over NCCL between the devices. This times both transports for the sizes of a packed step
buffer (int32), from rank 0 to every rank:

* gloo: blocking broadcasts of a CPU tensor, back to back (µs each, median of 20 rounds of 20);
* NCCL (CUDA only): 16 broadcasts captured in one CUDA graph and replayed, as a step would run them.

Run it from the repository root or from `benchmarks/` (it shares the graph timer of `all_reduce_bench.py`).

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/handoff_bench.py --out handoff.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from all_reduce_bench import time_graph  # run from benchmarks/, or with it on the path


def time_gloo(buf: torch.Tensor, group, rounds: int = 20, per_round: int = 20) -> float:
    times = []
    for _ in range(rounds):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(per_round):
            dist.broadcast(buf, src=0, group=group)
        times.append((time.perf_counter() - start) / per_round)
    return statistics.median(times) * 1e6


def time_nccl(buf: torch.Tensor) -> float:
    """µs per broadcast replayed from a graph of CALLS of them (`all_reduce_bench.time_graph`)."""
    return time_graph(lambda x: dist.broadcast(x, src=0), buf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--kib", default="4,16,108,256", help="packed step buffer sizes, KiB")
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if cuda else "gloo")
    gloo = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    rows = []
    for kib in map(float, args.kib.split(",")):
        n = int(kib * 1024) // 4
        row = {"kib": kib, "gloo_us": time_gloo(torch.full((n,), rank, dtype=torch.int32), gloo)}
        if cuda:
            buf = torch.full((n,), rank, dtype=torch.int32, device="cuda")
            row["nccl_graph_us"] = time_nccl(buf)
            row["nccl_received_rank0"] = bool((buf == 0).all())
        rows.append(row)
    if rank == 0:
        info = {"world": dist.get_world_size(), "device": torch.cuda.get_device_name() if cuda else "cpu",
                "torch": torch.__version__, "cpus": os.cpu_count()}
        print(f"{info['world']} ranks, {info['device']}: µs per broadcast of a packed step buffer from rank 0")
        print("KiB | gloo (host) µs | NCCL (graph) µs")
        for r in rows:
            print(f"{r['kib']:.0f} | {r['gloo_us']:.1f} | {r.get('nccl_graph_us', float('nan')):.1f}")
        with open(args.out, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)
    dist.barrier()
    os._exit(0)  # NCCL communicators captured in graphs: no teardown


if __name__ == "__main__":
    main()
