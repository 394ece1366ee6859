"""Draw the GPU benchmark figures from engine_bench.py's JSON: batch scaling, and busy fraction per engine.

    python benchmarks/plot_results.py docs/data/h200-bench-2026-11-26.json docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("out_dir")
    ap.add_argument("--transformers-json", default=None, help="transformers rows measured in another call")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.bench_json).read_text())
    info = data["info"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{info['device']}, Llama-3-8B shape bf16, {info['date']}"

    scaling = sorted(((int(b), r) for b, r in data["scaling"].items()), key=lambda x: x[0])
    batches = [b for b, _ in scaling]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(batches, [r["tokens_per_s"] for _, r in scaling], "o-", label="tokens/s")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch (requests)")
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title("default engine: throughput")
    for b, r in scaling:
        ax1.annotate(f"{r['roofline_fraction']:.0%} of roofline", (b, r["tokens_per_s"]), fontsize=7,
                     textcoords="offset points", xytext=(4, -10))
    ax2.plot(batches, [r["device_ms_per_step"] for _, r in scaling], "o-", label="device time per step")
    ax2.plot(batches, [r["host_ms_per_step"] for _, r in scaling], "s--", label="host time per step")
    ax2.plot(batches, [r["roofline_step_ms"] for _, r in scaling], ":", label="bandwidth floor per step")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch (requests)")
    ax2.set_ylabel("ms per decode step")
    ax2.set_title("host stays below device time")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "h200-batch-scaling.png", dpi=110)

    engines = list(data["engines"].items())
    rows = [(n, r["busy_fraction"], r["nvml_util_mean"], r["tokens_per_s"]) for n, r in engines]
    if args.transformers_json:
        hf = json.loads(Path(args.transformers_json).read_text())["transformers"]
        rows += [(n.replace("transformers generate_batch ", "transformers "), None, r["nvml_util_mean"],
                  r["tokens_per_s"]) for n, r in hf.items()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r[0] for r in rows]
    y = range(len(rows))
    ax1.barh([i + 0.2 for i in y], [r[1] or 0 for r in rows], height=0.4, label="compute-stream busy (CUDA events)")
    ax1.barh([i - 0.2 for i in y], [(r[2] or 0) / 100 for r in rows], height=0.4, label="NVML utilisation")
    ax1.set_yticks(list(y), names, fontsize=8)
    ax1.set_xlim(0, 1.05)
    ax1.invert_yaxis()
    ax1.legend(fontsize=7, loc="lower right")
    ax1.set_title("busy fraction during decode")
    ax2.barh(list(y), [r[3] for r in rows])
    ax2.set_yticks(list(y), names, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_title("generated tokens / s (32 requests)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "h200-busy-and-throughput.png", dpi=110)
    print(f"wrote {out / 'h200-batch-scaling.png'} and {out / 'h200-busy-and-throughput.png'}")


if __name__ == "__main__":
    main()
