"""transformers' fastest single-GPU decode path as a baseline: `model.generate` with a static KV cache, its decode
steps compiled by transformers itself (`--compile auto`, the default: transformers 5 compiles the forward with
`reduce-overhead`, inductor kernels replayed from CUDA graphs, and marks each step for the graph trees), greedy,
every request exactly `new_tokens` long. `--compile forward` compiles `model.forward` by hand instead (the older
recipe; with transformers 5.17 it fails on an H100: the graph trees overwrite logits that generate still reads).

Equal-length prompts only (no padding). Two untimed full generations compile and capture; two timed ones give the
wall time; then a generation of one token gives the prefill time, and
`decode_ms_per_step = (total - prefill) / (new_tokens - 1)`. `decode_ms_per_step_events` is the steady-state step
interval from CUDA events recorded at each step (by a logits processor, without a host sync), first decode step
excluded: it leaves out what each `generate` call pays once (a fresh static cache, graph re-recording).

    python benchmarks/hf_static.py --out hf_static.json --preset llama3-8b --requests 32 --prompt 128 --new 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import time

import torch

COMPILE_MODES = ("forward", "auto", "none")


class StepStamps:
    """A logits processor that records a CUDA event at each generation step and changes nothing."""

    def __init__(self) -> None:
        self.events: list[torch.cuda.Event] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        return scores

    def steady_ms(self) -> float | None:
        """Mean interval between steps, from the second decode step on (None for fewer than 3 steps)."""
        ev = self.events
        return ev[1].elapsed_time(ev[-1]) / (len(ev) - 2) if len(ev) >= 3 else None


class _QuietEos(logging.Filter):
    """Drops generate's warning about eos_token_id=-1 (deliberate here), which it logs on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should consist of positive integers" not in record.getMessage()


def versions() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}


def run_hf_static(model, prompts: list[list[int]], new_tokens: int, *, compile_mode: str = "auto") -> dict:
    """Time `model.generate` with a static cache, compiled (`compile_mode`: "forward" = the older recipe, the
    forward compiled by hand with transformers' own auto-compile off so nothing is compiled twice; "auto" =
    transformers' automatic compile of decode steps; "none" = no compile, for checks on a CPU). Any failure
    (compile errors included) comes back as {"error": "<type>: <msg>"}. The model is handed back with its own
    forward and generation config."""
    info = {**versions(), "compile": compile_mode, "requests": len(prompts), "new_tokens": new_tokens}
    saved_forward = model.__dict__.get("forward")  # an instance attribute only if someone set one
    saved_cache = model.generation_config.cache_implementation
    quiet, gen_log = _QuietEos(), logging.getLogger("transformers.generation.utils")
    gen_log.addFilter(quiet)
    try:
        return {**info, **_run(model, prompts, new_tokens, compile_mode)}
    except Exception as exc:  # noqa: BLE001  (a failed baseline must not end the whole benchmark)
        return {**info, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if saved_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = saved_forward
        model.generation_config.cache_implementation = saved_cache
        gen_log.removeFilter(quiet)
        with contextlib.suppress(Exception):  # after a CUDA error this raises again: the error is reported already
            _sync(model)
            torch.cuda.empty_cache()


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _run(model, prompts: list[list[int]], new_tokens: int, compile_mode: str) -> dict:
    from transformers import GenerationConfig, LogitsProcessorList

    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must all have the same length (this path runs without padding)")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (prefill plus at least one decode step), got {new_tokens}")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:
        model.config._attn_implementation = "sdpa"
    model.eval()
    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
    # Explicit: without it, generate infers a mask from pad_token_id and would mask prompt tokens equal to it.
    mask = torch.ones_like(ids)
    prompt_len = ids.shape[1]
    model.generation_config.cache_implementation = "static"
    if compile_mode == "forward":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def generate(n: int, stamps: StepStamps | None = None) -> torch.Tensor:
        # eos_token_id=-1 matches no token, so every request runs exactly n steps (random weights sample EOS too),
        # and unlike min_new_tokens it adds no logits processor to each step. max_cache_len: one cache size for
        # every call (the one-token prefill run included), so the compiled graphs see one shape.
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0,
                               cache_implementation="static", disable_compile=compile_mode != "auto",
                               max_cache_len=prompt_len + new_tokens)
        processors = LogitsProcessorList([stamps] if stamps is not None else [])
        out = model.generate(ids, attention_mask=mask, generation_config=cfg, logits_processor=processors)
        if out.shape[1] != prompt_len + n:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt_len} new tokens, expected {n}")
        return out[:, prompt_len:]

    t0 = time.perf_counter()
    for _ in range(2):  # compile, then capture: the prefill graph records on its second call
        generate(new_tokens)
    _sync(model)
    warmup_s = time.perf_counter() - t0
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls, steady = [], []
    for _ in range(2):
        stamps = StepStamps() if model.device.type == "cuda" else None
        _sync(model)
        t0 = time.perf_counter()
        tokens = generate(new_tokens, stamps)
        _sync(model)
        walls.append(time.perf_counter() - t0)
        steady.append(stamps.steady_ms() if stamps else None)
    generate(1)  # after the full runs: should this shape compile anew, the timed full runs are done already
    prefills = []
    for _ in range(2):
        _sync(model)
        t0 = time.perf_counter()
        generate(1)
        _sync(model)
        prefills.append(time.perf_counter() - t0)
    total_ms, prefill_ms = sum(walls) / len(walls) * 1e3, sum(prefills) / len(prefills) * 1e3
    steady_ms = [s for s in steady if s is not None]
    return {
        "wall_s": total_ms / 1e3,
        "walls_s": walls,
        "prefill_ms": prefill_ms,
        "decode_ms_per_step": (total_ms - prefill_ms) / (new_tokens - 1),
        "decode_ms_per_step_events": sum(steady_ms) / len(steady_ms) if steady_ms else None,
        "tokens_per_s": len(prompts) * new_tokens / (total_ms / 1e3),
        "warmup_s": warmup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else None,
        "tokens": tokens.tolist(),
    }


def compare(hf: dict, ours: dict, engine: str) -> dict:
    """HF static's decode step over an asyncbatch run's (`decode_step_ms` of engine_bench's `run_engine`) on the
    same work: `speedup_vs_hf_static_compiled` > 1 where asyncbatch is faster. `_events`: with HF's steady-state
    step instead, which leaves out what each generate call pays once."""
    hf_ms, events_ms, ours_ms = hf.get("decode_ms_per_step"), hf.get("decode_ms_per_step_events"), ours.get("decode_step_ms")

    def ratio(x: float | None) -> float | None:
        return x / ours_ms if x and ours_ms else None

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    same = hf["tokens"] == ours["tokens"] if hf.get("tokens") is not None and ours.get("tokens") is not None else None
    c = {"engine": engine, "batch": hf.get("requests"), "new_tokens": hf.get("new_tokens"),
         "asyncbatch_decode_step_ms": ours_ms, "hf_decode_ms_per_step": hf_ms, "hf_decode_ms_per_step_events": events_ms,
         "speedup_vs_hf_static_compiled": ratio(hf_ms), "speedup_vs_hf_static_compiled_events": ratio(events_ms),
         "tokens_equal": same}
    c["summary"] = (f"HF static compiled failed: {hf['error'].splitlines()[0]}" if "error" in hf else
                    f"speedup vs HF static compiled: {fmt(ratio(hf_ms))}x = HF {fmt(hf_ms)} ms/step / {engine} "
                    f"{fmt(ours_ms)} ms/step (HF steady-state step {fmt(events_ms)} ms: {fmt(ratio(events_ms))}x); "
                    f"batch {c['batch']}, {c['new_tokens']} new tokens, tokens equal: {same}")
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                    help="auto: transformers' own compile of decode steps (works on transformers 5.17); forward: "
                         "torch.compile(model.forward) by hand, the older recipe; none: eager (CPU checks)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    # Same directory: the prompts engine_bench uses.
    from bench_measures import make_prompts

    from asyncbatch.core.config import ModelConfig
    from asyncbatch.core.models import build_model
    from asyncbatch.core.plugin_host import get_plugin_host

    t0 = time.perf_counter()
    model, _ = build_model(ModelConfig(preset=args.preset, dtype=args.dtype, device=args.device), get_plugin_host())
    build_s = time.perf_counter() - t0
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = make_prompts(args.requests, args.prompt, vocab)
    r = run_hf_static(model, prompts, args.new, compile_mode=args.compile)
    r.update(preset=args.preset, prompt=args.prompt, build_s=build_s, date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as fh:
        json.dump(r, fh)
    if "error" in r:
        print(f"hf static failed: {r['error']}")
        raise SystemExit(1)
    steady = r["decode_ms_per_step_events"]
    print(f"{r['device']}: {r['tokens_per_s']:.0f} tok/s, prefill {r['prefill_ms']:.1f} ms, decode "
          f"{r['decode_ms_per_step']:.2f} ms/step ({'-' if steady is None else f'{steady:.2f}'} ms/step from events), "
          f"warm-up {r['warmup_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
