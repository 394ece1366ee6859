"""Scale-out over several processes through `torch.distributed`: data parallelism (`engine.parallel.data`) and
tensor parallelism (`engine.parallel.tensor`).

Every rank runs the same experiment (SPMD, as under `torchrun`): it builds the same model and the same workload.
With data parallelism each rank computes the same assignment of requests to replicas (`router`, deterministic,
so no collective is needed to agree on it), runs its share on its own engine and device, and sends its outputs
to rank 0 (`world`, gloo, every collective with a timeout), which merges them in input order and writes the
results. With tensor parallelism each rank keeps a shard of every decoder layer (`tensor`) and all ranks run
the same batches in lockstep. `launch` starts the ranks for `asyncbatch run` and turns a rank that dies into a
failed run that names it.
"""
