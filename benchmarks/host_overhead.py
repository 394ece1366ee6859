"""Host time per decode step on the CPU: scheduling, input preparation and output update, at batch 32 and 256.

This is the work the asynchronous pipeline hides behind device compute. It does not depend on the model's size,
only on the batch and on the KV geometry, so the tiny model stands in for the 8B one; its context is raised to
8192 tokens (the llama3-8b preset's) so block tables are as wide as in the GPU benchmark. The `cpu` runtime runs
compute inside the launch, which is timed apart and not counted.

    python benchmarks/host_overhead.py --out host.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from asyncbatch import Engine, EngineConfig, SamplingParams


def measure(batch: int, prompt: int, new: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = EngineConfig.from_dict({
        "model": {"preset": "tiny", "dtype": "float32", "device": "cpu",
                  "overrides": {"max_position_embeddings": 8192}},
        "runtime": "cpu", "buffers": "double", "streams": "three", "graphs": "eager", "compile": "none",
        "batch": {"max_tokens": 2048, "max_seqs": batch},
        "cache": {"block_size": 16, "num_blocks": batch * (-(-(prompt + new) // 16)) + 16}})
    engine = Engine.from_config(cfg)
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(prompt)] for _ in range(batch)]
    engine.generate(prompts[: min(batch, 8)], SamplingParams(max_new_tokens=4))  # warm up
    result = engine.run(engine.make_requests(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True)))
    decode = [s for s in result.steps if s.num_decode == s.num_seqs == batch]
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return {
        "batch": batch, "decode_steps": len(decode),
        "schedule_ms": ms([s.schedule_s for s in decode]),
        "prepare_ms": ms([s.prepare_s for s in decode]),
        "update_ms": ms([s.update_s for s in decode]),
        "schedule_plus_prepare_ms": ms([s.schedule_s + s.prepare_s for s in decode]),
        "host_ms": ms([s.host_s for s in decode]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the tiny model's compute")
    args = ap.parse_args()
    rows = [measure(int(b), args.prompt, args.new, args.threads) for b in args.batches.split(",")]
    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "prompt": args.prompt, "new": args.new}
    print(json.dumps(info))
    head = ("batch", "schedule ms", "prepare ms", "update ms", "schedule+prepare ms", "host ms/step")
    print("  ".join(head))
    for r in rows:
        print("  ".join(f"{v:>{len(h)}.3f}" if isinstance(v, float) else f"{v:>{len(h)}}"
                        for h, v in zip(head, (r["batch"], r["schedule_ms"], r["prepare_ms"], r["update_ms"],
                                               r["schedule_plus_prepare_ms"], r["host_ms"]))))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
