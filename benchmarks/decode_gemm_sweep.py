"""`engine.decode_gemm` and `engine.pdl` inside the default engine: tile sets of the Triton decode GEMM, with and
without programmatic dependent launch, against cuBLAS, in one process on one model (8B Llama shape, bf16).

Each variant is a fresh engine on the shared model (`engine_bench.run_engine`: warm-up, then 32 requests x 128-token
prompts x `new` tokens, greedy). A tile set replaces `decode_gemm_kernels.tile` for its variant; `rule` is the
library's own. Dynamo is reset when `pdl` changes, so each engine compiles its layers afresh. The last column
names the earlier variants whose tokens were identical.

    python benchmarks/decode_gemm_sweep.py sweep.json [new tokens, default 256] [batch, default 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_bench as eb  # noqa: E402

from asyncbatch.core import decode_gemm_kernels as kernels  # noqa: E402
from asyncbatch.core.compile import set_compiled  # noqa: E402
from asyncbatch.core.config import ModelConfig  # noqa: E402
from asyncbatch.core.models import build_model  # noqa: E402
from asyncbatch.core.plugin_host import get_plugin_host  # noqa: E402

T = kernels.Tile
RULE = kernels.tile


def table(by_n: dict[int, kernels.Tile]):
    return lambda rows, n, element_size=2, k=None: by_n.get(n) or RULE(rows, n, element_size, k=k)


SETS = {  # by output width N of the 8B shape: q/k/v 6144, o and down 4096, gate/up 28672
    "rule": RULE,
    "r32x6": table({6144: T(32, 128, 4, 6), 4096: T(32, 128, 4, 6), 28672: T(64, 128, 4, 4)}),
    "iso": table({6144: T(32, 256, 4, 3), 4096: T(16, 256, 4, 4), 28672: T(32, 128, 4, 4)}),
    "n16": table({6144: T(16, 256, 4, 4), 4096: T(16, 256, 4, 4), 28672: T(64, 256, 4, 3)}),
}
VARIANTS = [("torch", "never", "rule"), ("torch", "always", "rule"), ("triton", "always", "r32x6"),
            ("triton", "always", "rule"), ("triton", "always", "iso"), ("triton", "always", "n16"),
            ("triton", "never", "rule"), ("triton", "never", "r32x6"), ("torch", "never", "rule")]


def main() -> None:
    out_path = sys.argv[1]
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    model, _ = build_model(ModelConfig(preset="llama3-8b", dtype="bfloat16", device="cuda"), get_plugin_host())
    prompts = eb.make_prompts(batch, 128, model.config.vocab_size)
    args = argparse.Namespace(block_size=16, attention="auto", compile="auto", fuse="always", batch_invariant=False,
                              max_tokens=2048, bandwidth=eb.copy_bandwidth(), decode_gemm=None, pdl=None)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {args.bandwidth / 1e12:.2f} TB/s")
    rows, tokens, last_pdl = [], [], None
    for i, (gemm, pdl, tiles) in enumerate(VARIANTS):
        if pdl != last_pdl:
            torch._dynamo.reset()
            set_compiled(model, False)
            last_pdl = pdl
        kernels.tile = SETS[tiles]
        args.decode_gemm, args.pdl = gemm, pdl
        t0 = time.time()
        r = eb.run_engine(model, ("double", "three", "mixed"), prompts, new, args)
        name = f"{i}:{gemm}/{pdl}/{tiles}"
        same = [n for n, t in tokens if t == r["tokens"]]
        tokens.append((name, r["tokens"]))
        print(f"{name:26s} step {r['decode_step_ms']:.3f} ms  roofline {r['roofline_fraction']:.3f}  "
              f"busy {r['busy_fraction']:.4f}  ({time.time() - t0:.0f} s)  same tokens as: {same}", flush=True)
        rows.append(dict(variant=name, same_tokens_as=same, **{k: v for k, v in r.items() if k != "tokens"}))
    kernels.tile = RULE
    with open(out_path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, new=new, batch=batch, rows=rows),
                  f, indent=1)


if __name__ == "__main__":
    main()
