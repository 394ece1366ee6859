"""Where the compute stream waits: every gap between consecutive decode steps, with its cause.

Runs the default engine on the 8B shape (or `--preset`) with host phases and device ops timed, then looks at each
gap between the end of comp[k] and the start of comp[k+1] on the compute stream and names what comp[k+1] was
waiting for:

- `host prep`: the host was still preparing batch k+1 (`prep[k+1]` ended after comp[k] did);
- `host other`: prep[k+1] had not even started when comp[k] ended, and the host was in a phase (`upd` of an
  earlier batch, say) or in none at all (Python, the OS, another thread);
- `h2d`: the inputs' copy ended after comp[k] did, though prep was done;
- `launch`: none of the above: the replay itself started late (launch latency, or the driver).

    python benchmarks/stall_report.py --out stalls.json                # 3 runs, batch 32, 512 new tokens
    python benchmarks/stall_report.py --out stalls-3.json --runs 5 --slots 3
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import threading
import time
from collections import Counter, defaultdict

import torch

from asyncbatch import Engine, EngineConfig, SamplingParams
from asyncbatch.core.config import ModelConfig
from asyncbatch.core.models import build_model
from asyncbatch.core.plugin_host import get_plugin_host
from asyncbatch.plugins.experiment import format_table


def classify(spans, min_gap_s: float) -> list[dict]:
    by = defaultdict(dict)
    host = []
    for s in spans:
        if s.track == "host":
            host.append(s)
            by[s.name, s.batch] = s
        else:
            by[s.name, s.batch] = s
    comps = sorted((s for s in spans if s.name == "comp"), key=lambda s: s.start)
    gaps = []
    for prev, nxt in zip(comps, comps[1:]):
        gap = nxt.start - prev.end
        if gap < min_gap_s:
            continue
        k = nxt.batch
        prep, h2d = by.get(("prep", k)), by.get(("h2d", k))
        if prep is not None and prep.end > prev.end:
            if prep.start > prev.end:
                busy = [h for h in host if h.start < prep.start and h.end > prev.end]
                cause = "host other: " + (", ".join(sorted({h.name for h in busy})) or "no phase")
            else:
                cause = "host prep"
        elif h2d is not None and h2d.end > prev.end + 1e-6:
            cause = "h2d"
        else:
            cause = "launch"
        gaps.append({"batch": k, "gap_ms": gap * 1e3, "cause": cause, "at_s": prev.end,
                     "prep_ms": (prep.end - prep.start) * 1e3 if prep else None})
    return gaps


def instrument_prep(pipeline) -> list[dict]:
    """Wrap the pipeline's prep with the main thread's CPU time and context switches: a long prep with CPU time
    close to its wall time is slow code; one with little CPU time was off the CPU, preempted (involuntary
    switches) or blocked (voluntary switches: waiting for the GIL or a lock)."""
    records: list[dict] = []
    original = pipeline._prepare

    def timed(k, *args, **kwargs):
        u0 = resource.getrusage(resource.RUSAGE_THREAD)
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return original(k, *args, **kwargs)
        finally:
            u1 = resource.getrusage(resource.RUSAGE_THREAD)
            records.append({"batch": k, "wall_ms": (time.perf_counter() - w0) * 1e3,
                            "cpu_ms": (time.thread_time() - c0) * 1e3,
                            "user_ms": (u1.ru_utime - u0.ru_utime) * 1e3, "sys_ms": (u1.ru_stime - u0.ru_stime) * 1e3,
                            "minor_faults": u1.ru_minflt - u0.ru_minflt, "major_faults": u1.ru_majflt - u0.ru_majflt,
                            "voluntary": u1.ru_nvcsw - u0.ru_nvcsw, "involuntary": u1.ru_nivcsw - u0.ru_nivcsw})

    pipeline._prepare = timed
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--min-gap-us", type=float, default=50.0)
    ap.add_argument("--slots", type=int, default=2, help="input/output slots (2: the default `double`)")
    ap.add_argument("--threads", type=int, default=None, help="engine.threads (torch CPU threads; default: torch's)")
    ap.add_argument("--blocking-waits", action="store_true",
                    help="engine.runtime.blocking_waits: the host sleeps in the driver while it waits on an event")
    args = ap.parse_args()

    model, _ = build_model(ModelConfig(preset=args.preset, dtype="bfloat16", device="cuda"), get_plugin_host())
    rng = random.Random(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(args.batch)]
    buffers = {1: "single", 2: "double"}.get(args.slots, {"name": "n_slot", "num_slots": args.slots})
    cfg = EngineConfig.from_dict({"runtime": {"name": "cuda", "timing": True, "trace_copies": True,
                                              "blocking_waits": args.blocking_waits},
                                  "buffers": buffers, "threads": args.threads,
                                  "batch": {"max_tokens": 4096, "max_seqs": args.batch},
                                  "cache": {"num_blocks": args.batch * ((128 + args.new) // 16 + 2) + 64}})
    engine = Engine.from_model(model, cfg)
    params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    runs = []
    for r in range(args.runs):
        engine.runtime.record_spans = True
        preps = instrument_prep(engine.pipeline)
        started = time.time()  # to line the run up with other processes' records (benchmarks/host_jitter.py)
        result = engine.run(engine.make_requests(prompts, params))
        engine.pipeline.__dict__.pop("_prepare", None)
        slow = [p for p in preps if p["wall_ms"] > 5.0]
        stats = {st.batch: st for st in result.steps}
        for p in slow:  # which part of prep: the scheduler (with the pools) or writing the inputs
            st = stats.get(p["batch"])
            p["schedule_ms"] = st.schedule_s * 1e3 if st else None
            p["prepare_ms"] = st.prepare_s * 1e3 if st else None
        fast = [p for p in preps if p["wall_ms"] <= 5.0]
        gaps = classify(engine.runtime.timeline(), args.min_gap_us / 1e6)
        total = Counter()
        count = Counter()
        for g in gaps:
            total[g["cause"]] += g["gap_ms"]
            count[g["cause"]] += 1
        runs.append({"run": r, "started_epoch": started, "ended_epoch": time.time(),
                     "busy": result.summary.compute_busy_fraction, "steps": result.summary.steps,
                     "host_ms_step": result.summary.host_step_ms, "compute_ms_step": result.summary.compute_step_ms,
                     "gap_ms_by_cause": dict(total), "gaps_by_cause": dict(count),
                     "largest": sorted(gaps, key=lambda g: -g["gap_ms"])[:10], "slow_preps": slow,
                     "prep_wall_ms_mean": sum(p["wall_ms"] for p in preps) / max(1, len(preps)),
                     "fast_prep_minor_faults_mean": sum(p["minor_faults"] for p in fast) / max(1, len(fast)),
                     "threads": threading.active_count()})
    rows = []
    for run in runs:
        for cause in sorted(run["gap_ms_by_cause"], key=lambda c: -run["gap_ms_by_cause"][c]):
            rows.append((run["run"], f"{run['busy']:.4f}", cause, run["gaps_by_cause"][cause],
                         f"{run['gap_ms_by_cause'][cause]:.2f}"))
    print(format_table(("run", "busy", "cause", "gaps", "total ms"), rows))
    print("busy by run: " + ", ".join(f"{run['busy']:.4f}" for run in runs))
    for run in runs:
        print(f"run {run['run']} preps > 5 ms (wall/user/sys ms, minor faults, vol/invol switches):",
              ", ".join(f"{p['wall_ms']:.1f}/{p['user_ms']:.1f}/{p['sys_ms']:.1f} {p['minor_faults']}f "
                        f"{p['voluntary']}/{p['involuntary']} sched {p['schedule_ms'] or 0:.1f} write "
                        f"{p['prepare_ms'] or 0:.1f}" for p in run["slow_preps"][:6]) or "none",
              f"; threads {run['threads']}")
        print(f"run {run['run']} largest gaps:", ", ".join(f"{g['gap_ms']:.2f} ms ({g['cause']}, batch "
                                                           f"{g['batch']})" for g in run["largest"][:5]))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "batch": args.batch, "new": args.new, "min_gap_us": args.min_gap_us, "slots": args.slots,
            "blocking_waits": args.blocking_waits,
            "threads": torch.get_num_threads()}
    with open(args.out, "w") as fh:
        json.dump({"info": info, "runs": runs}, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
