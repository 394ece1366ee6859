"""One run of an experiment: a repetition of a sweep cell, or the whole experiment when there is no sweep.

`run_cell` builds the engine around the model (`ModelCache` keeps the last one, so cells with an identical
`engine.model` share it), runs the workload, and writes the run's directory: `results.json` (`results_dict`:
summary, per-request records with every token's time, per-step numbers), `config.yaml`, and where asked
`environment.json` and a Chrome trace. `experiment` decides which runs there are and writes what spans them.
"""

from __future__ import annotations

import gc
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..core.config import ExperimentConfig, ModelConfig
from ..core.plugin_host import PluginHost
from ..core.races import RaceError, RaceReport
from ..core.stats import RunContext, RunSummary
from ..core.types import Request
from ..parallel import tensor as tensor_parallel
from ..parallel.replicas import run_replicated
from ..parallel.world import World
from .environment import environment
from .report import cell_label, write_json, write_yaml
from .workloads import checked_requests


@attrs.frozen
class CellResult:
    """One finished run: a repetition of a sweep cell (the whole experiment when there is no sweep)."""

    index: int
    assignment: dict
    config: ExperimentConfig
    summary: RunSummary
    runtime: str
    online: bool
    out_dir: Path
    trace: Path | None = None
    repetition: int = 0
    races: RaceReport | None = None  # None: not checked; empty: checked and race-free


def _us(t: float) -> float:
    return round(t, 6)  # microseconds: far below any latency measured here, and keeps results.json small


def results_dict(cell_index: int, assignment: dict, cfg: ExperimentConfig, result: Any, runtime: str,
                 repetition: int = 0, ranks: Sequence[Any] = ()) -> dict:
    """What one run's `results.json` holds; `ranks`: each data-parallel replica's own summary."""
    outputs = [{
        "request_id": o.request_id, "prompt_tokens": len(o.prompt_ids), "output_tokens": len(o.token_ids),
        "finish_reason": o.finish_reason, "error": o.error, "arrival_time": _us(o.arrival_time),
        "finish_time": _us(o.finish_time), "ttft": o.ttft, "latency": o.latency,
        "num_preemptions": o.num_preemptions,
        "cached_tokens": getattr(o, "num_cached_tokens", 0),  # prompt tokens read from the prefix cache
        # When the host learned each token, in seconds since the run started: any latency metric can be recomputed.
        "token_times": [_us(t) for t in o.token_times],
        # A digest, not the tokens: enough to check that a rerun produced the same text.
        "tokens_sha1": hashlib.sha1(",".join(map(str, o.token_ids)).encode()).hexdigest()[:16],
    } for o in result.outputs]
    steps = [{**attrs.asdict(s), "host_s": s.host_s} for s in result.steps]
    return {"name": cfg.name, "cell": cell_index, "repetition": repetition, "assignment": assignment,
            "runtime": runtime, "seeds": {"seed": cfg.seed, "engine": cfg.engine.seed, "model": cfg.engine.model.seed},
            "summary": attrs.asdict(result.summary),
            # null: the runtime does not check for races; otherwise the report (count 0 when there were none)
            "races": result.races.to_dict() if getattr(result, "races", None) is not None else None,
            "outputs": outputs, "steps": steps,
            # data-parallel runs: each replica's own numbers (the summary above is over all of them)
            **({"ranks": [attrs.asdict(r) for r in ranks]} if ranks else {})}


class ModelCache:
    """Keeps the last built model, so sweep cells with an identical `engine.model` section share it."""

    def __init__(self, host: PluginHost, world: World = World()) -> None:
        self.host = host
        self.world = world  # a tensor-parallel rank builds its shard of the model only
        self.key: ModelConfig | None = None
        self.value: tuple[Any, Any] | None = None

    def get(self, cfg: ModelConfig) -> tuple[Any, Any]:
        from ..core import models  # looked up at call time, so tests can stand in for build_model

        if self.value is None or self.key != cfg:
            self.value = None
            _free_memory()
            tensor_parallel.check_model(cfg, self.world.tensor, self.host)  # what `asyncbatch run` checked first
            on_layer = tensor_parallel.layer_sharder(self.world, cfg.path or cfg.source_preset or "the model")
            self.value = models.build_model(cfg, self.host, **({"on_layer": on_layer} if on_layer else {}))
            if on_layer is not None:
                w = self.world
                tensor_parallel.mark_sharded(self.value[0], w.tensor, group=w.tp_group, rank=w.tp_rank,
                                             shard_head=w.shard_lm_head)
            self.key = cfg
        return self.value


def _free_memory() -> None:
    # The previous engine (and model, if replaced) must be gone, its cached blocks returned to the driver, before
    # the next engine sizes its KV cache from free device memory. Engines hold reference cycles: collect.
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _progress_bar(enabled: bool, requests: Sequence[Request], label: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # Tokens to come; a request whose max_new_tokens is not a count fails alone when the run starts.
    total = sum(n for r in requests if type(n := r.params.max_new_tokens) is int)
    return tqdm(total=total, unit="tok", desc=label, leave=False, file=sys.stderr, dynamic_ncols=True)


def run_cell(index: int, assignment: dict, cfg: ExperimentConfig, cache: ModelCache, out_dir: Path, *,
             argv: Sequence[str], trace_path: Path | None, progress: bool, env_path: Path | None,
             repetition: int = 0, world: World = World()) -> CellResult:
    """Build the engine (reusing the cached model), run the workload, write the run's files."""
    from ..core.engine import Engine

    _free_memory()
    start = time.perf_counter()
    model, tokenizer = cache.get(cfg.engine.model)
    model_s = time.perf_counter() - start  # zero when an earlier sweep cell built the same model
    show = progress and cfg.output.progress and cfg.engine.startup.progress
    engine_cfg = attrs.evolve(cfg.engine, startup=attrs.evolve(cfg.engine.startup, progress=show))
    if world.tensor > 1:
        tensor_parallel.prepare(model, world)
    engine = Engine.from_model(model, engine_cfg, tokenizer=tokenizer, host=cache.host,
                               agree_kv_blocks=tensor_parallel.kv_blocks_agreement(world))
    # Start-up of this run: building the model, the engine, and every compile and capture before the clock; the
    # summary (and so every hook) reports it.
    engine.startup_s += model_s
    factory = cache.host.registry("workload").get(cfg.workload.name, "workload").factory
    workload = factory(cfg.workload.config, vocab_size=engine.geometry["vocab"], seed=cfg.seed)
    requests = checked_requests(workload.requests(cfg.sampling, tokenizer=engine.tokenizer), cfg.workload.name)
    if world.tensor > 1:
        tensor_parallel.check_requests(requests)
    engine.runtime.record_spans = trace_path is not None
    label = cell_label(assignment)
    bar = _progress_bar(progress and cfg.output.progress, requests, label)
    context = RunContext(config=cfg.to_dict(), cell=index, assignment=dict(assignment), repetition=repetition,
                         out_dir=out_dir, num_requests=len(requests))
    on_token = (lambda ev: ev.token_id >= 0 and bar.update(1)) if bar is not None else None
    ranks: list = []
    try:
        if world.size > 1:
            result, ranks = run_replicated(engine, requests, world, context=context, on_token=on_token)
        else:
            result = engine.run(requests, context=context, on_token=on_token)
    except RaceError as exc:
        if exc.result is None:
            raise  # the run broke (exc.__cause__): there is no complete result to write
        result = exc.result  # written below with its race report; run_experiment fails once every run is done
    finally:
        if bar is not None:
            bar.close()
    runtime = engine.runtime.name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results_dict(index, assignment, cfg, result, runtime, repetition, ranks))
    write_yaml(out_dir / "config.yaml", cfg.to_dict())
    if env_path is not None:
        write_json(env_path, environment(cfg, engine, argv))
    written = None
    if trace_path is not None:
        from .trace import write_chrome_trace

        written = write_chrome_trace(engine.runtime.timeline(), trace_path, f"asyncbatch {runtime} runtime")
    return CellResult(index, assignment, cfg, result.summary, runtime,
                      any(r.arrival_time > 0 for r in requests), out_dir, written, repetition, result.races)
