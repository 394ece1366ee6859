"""`Engine`: the public entry point, and the one place where strategies are composed into a pipeline.

What one `Engine.run` does around the pipeline's loop (its request book, hooks, clock, summary) is in `engine_run`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

from . import assembly, model_state
from .attention_api import AttentionContext, deactivate
from .cancels import Cancels
from .collector import CollectorPause
from .config import EngineConfig
from .engine_run import run_requests
from .errors import ConfigError
from .intake import Intake
from .kv_sizing import allocate_kv, check_slot_buffers, kv_cache_blocks, max_model_len, memory_report
from .layout import HostBatchWriter, SlotLayout
from .model_support import context_limit
from .models import build_model, eos_token_ids, model_geometry, prepare_model
from .pipeline import Pipeline, PipelineDebug
from .plugin_host import PluginHost, get_plugin_host
from .runtime.base import Runtime
from .startup import MODES, Warmup, use_compile_cache
from .stats import RunContext, RunResult
from .step import StepBody
from .streaming import stream_events
from .types import Output, Request, SamplingParams, TokenEvent

log = logging.getLogger("asyncbatch")


class Engine:
    """Continuous batching over a transformers causal LM, composed from the configured strategies."""

    def __init__(self, model: Any, config: EngineConfig, *, tokenizer: Any = None, host: PluginHost | None = None,
                 runtime: Runtime | None = None, debug: PipelineDebug = PipelineDebug(),
                 agree_kv_blocks: Callable[[int], int] | None = None) -> None:
        import torch

        built = time.perf_counter()
        self.host = host or get_plugin_host()
        self.config = config = config.with_defaults_resolved(self.host)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self._caller_attention = getattr(model.config, "_attn_implementation", None)  # for release()
        self.model = prepare_model(model)
        self.tokenizer = tokenizer
        geo = self.geometry = model_geometry(model)
        self.eos_ids = eos_token_ids(model, geo["vocab"])
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.runtime = runtime or assembly.build_runtime(self.host, config.runtime, device)
        if self.runtime.device.type != device.type:
            raise ConfigError("engine.runtime", f"runtime {self.runtime.name!r} runs on {self.runtime.device} but "
                                                f"the model is on {device}")
        parts = assembly.build_pipeline_parts(self.host, config, self.runtime)
        self.scheduler, buffers, topology, graphs = parts.scheduler, parts.buffers, parts.topology, parts.graphs
        self._strategies = parts.strategies(config)
        self.batch_invariant = config.batch_invariant
        if self.batch_invariant:
            from .invariant import check_supported

            check_supported(device)
        self.backend, self.attention_name = assembly.choose_attention(
            self.host, config.attention, device, dtype, geo["head_dim"], config.cache.block_size,
            invariant=self.batch_invariant)
        self.model_state = model_state.decide(config, self.runtime, parts.graph_name)
        self.compiled, self.fused = self.model_state.compiled, self.model_state.fused
        self.backend.use_dependent_launch(self.model_state.pdl)
        if self.compiled:
            use_compile_cache(config.startup.compile_cache)
        model_state.settle(model, self.model_state)
        model_state.check_rotary(model, self.model_state, self.backend, self.attention_name)

        bs = config.cache.block_size
        num_blocks = kv_cache_blocks(config.cache, device, dtype, geo, self.runtime.free_memory())
        if agree_kv_blocks is not None:  # processes that must hold the same count (tensor-parallel ranks)
            num_blocks = agree_kv_blocks(num_blocks)
        self.max_len = max_model_len(config.cache, geo, num_blocks)
        self.num_blocks = num_blocks
        self.intake = Intake(tokenizer=tokenizer, vocab=geo["vocab"], max_len=self.max_len, seed=config.seed,
                             eos_ids=self.eos_ids, limits=f"model context {geo['max_positions']} from "
                                                          f"{context_limit(model.config)[1]}; KV cache "
                                                          f"{(num_blocks - 1) * bs} tokens")
        max_blocks = -(-self.max_len // bs)
        self.k_cache, self.v_cache = allocate_kv(num_blocks, bs, geo, dtype, device)
        rows = config.batch.max_seqs
        layout = SlotLayout(config.batch.max_tokens, config.batch.max_seqs, max_blocks)
        check_slot_buffers(buffers.num_slots, layout, device, self.runtime.free_memory())
        self.writer = HostBatchWriter(layout, rows, bs)
        self.last_token = self.runtime.device_buffer(rows + 1, torch.int32)
        attn = self.attention_context = AttentionContext(self.backend, self.k_cache, self.v_cache)
        body = StepBody(self.model, layout, attn, self.last_token, bs, pass_context=not self.compiled)
        self.pipeline = Pipeline(runtime=self.runtime, topology=topology, buffers=buffers, graphs=graphs,
                                 scheduler=self.scheduler, backend=self.backend, body=body, layout=layout,
                                 writer=self.writer, batch=config.batch, block_size=bs, debug=debug)
        self.graphs = graphs
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside run(): a call back into the engine from it must fail
        self._cancels = Cancels()
        self._collector = CollectorPause(self.runtime.graph_support == "native")
        self.last_result: RunResult | None = None
        log.info("engine: runtime=%s scheduler=%s buffers=%s streams=%s graphs=%s attention=%s prefix_cache=%s; %d KV "
                 "blocks of %d tokens, max_len %d", self.runtime.name, config.scheduler.name, config.buffers.name,
                 config.streams.name, parts.graph_name, self.attention_name, config.prefix_cache.name, num_blocks, bs,
                 self.max_len)
        self.warm = Warmup(self.pipeline, graphs, compiled=self.compiled, progress=config.startup.progress)
        warm = config.startup.warmup
        self.warms_up = warm == "always" or (warm == "auto" and self.runtime.graph_support == "native")
        if self.warms_up:
            self.warmup(modes=("greedy",))
        #: Seconds spent building (and warming up) that no run has reported yet; the next run's summary carries
        #: them as `startup_s` and resets this.
        self.startup_s = time.perf_counter() - built

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: EngineConfig, *, host: PluginHost | None = None, runtime: Runtime | None = None,
                    debug: PipelineDebug = PipelineDebug()) -> Engine:
        """Build the model described by `config.model`, then the engine around it."""
        host = host or get_plugin_host()
        config = config.with_defaults_resolved(host)
        start = time.perf_counter()
        model, tokenizer = build_model(config.model, host)
        built = time.perf_counter() - start
        engine = cls(model, config, tokenizer=tokenizer, host=host, runtime=runtime, debug=debug)
        engine.startup_s += built
        return engine

    @classmethod
    def from_model(cls, model: Any, config: EngineConfig | None = None, *, tokenizer: Any = None,
                   host: PluginHost | None = None, runtime: Runtime | None = None,
                   debug: PipelineDebug = PipelineDebug(), agree_kv_blocks: Callable[[int], int] | None = None
                   ) -> Engine:
        """Wrap an already-loaded transformers causal LM (`config.model` is ignored). `agree_kv_blocks` turns
        the KV block count this process would allocate into the one it must (the smallest over processes that
        have to schedule alike)."""
        return cls(model, config or EngineConfig(), tokenizer=tokenizer, host=host, runtime=runtime, debug=debug,
                   agree_kv_blocks=agree_kv_blocks)

    # ------------------------------------------------------------------ requests
    def make_requests(self, prompts: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None = None,
                      *, request_ids: Sequence[str] | None = None,
                      arrival_times: Sequence[float] | None = None) -> list[Request]:
        """Pair prompts with parameters (one shared, or one per prompt). Call-level mistakes raise here; default
        request ids are unique over the engine's lifetime."""
        return self.intake.make_requests(prompts, params, request_ids=request_ids, arrival_times=arrival_times)

    # ------------------------------------------------------------------ running
    def run(self, requests: Sequence[Request], *, on_token: Callable[[TokenEvent], None] | None = None,
            context: RunContext | None = None) -> RunResult:
        """Serve `requests` (arrival times honoured) until all end. Outputs come back in input order.

        `requests` must be `Request`s with distinct string ids (else `TypeError` / `ValueError`, nothing run); a
        bad value inside one request fails that request alone.

        `on_token` gets every token as the host learns it, and one event with `token_id == -1` for a request that
        ends without a token (cancelled, or failed with an error). Calling back into this engine from `on_token` or
        a lifecycle hook raises `RuntimeError` (the run holds the engine). `context` is what the run-level
        lifecycle hooks receive; by default ``{"engine": <this engine's config>}``, cell 0, no output directory.
        A lifecycle hook that raises is logged and counted in `result.summary.hook_errors`, an
        `asyncbatch_run_finished` one too (the summary those hooks get cannot count their own failures).

        On a runtime that checks accesses (`sim` with `check: true`), a run with races raises
        `asyncbatch.core.races.RaceError`: its `report` names each unordered pair and the missing edge, its `result`
        holds this run's result where the run completed (`result.races` is the same report).
        """
        self._check_not_reentrant()
        self.intake.check_requests(requests)  # a call-level mistake raises here, before the run holds anything
        if context is None:
            context = RunContext(config={"engine": self.config.to_dict()}, num_requests=len(requests))
        with self._lock:
            self._owner = threading.get_ident()
            try:
                return run_requests(self, requests, on_token, context)
            finally:
                self._owner = None

    def _check_not_reentrant(self) -> None:
        if self._owner == threading.get_ident():
            raise RuntimeError("this engine is running a call on this thread (an on_token callback or a lifecycle "
                               "hook called back into it); call it after the run returns, or use another engine")

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the engine for a caller that drives `pipeline` itself until it leaves the block (the live engine of
        `asyncbatch serve`): the model is in this engine's state, other threads' calls wait, and a call back into
        the engine from this thread raises. The collector stays on: a server cannot go days without collecting."""
        self._check_not_reentrant()
        with self._lock:
            self._owner = threading.get_ident()
            model_state.bind(self.model, self.model_state, self.attention_context)
            try:
                yield
            finally:
                deactivate()
                self._owner = None

    def _bind_model(self) -> None:
        """Put the (possibly shared) model in this engine's state, and keep the collector out of the run."""
        model_state.bind(self.model, self.model_state, self.attention_context)
        self._collector.pause()

    def new_prefix_cache(self) -> Any:
        """A fresh index of the configured prefix cache, for one run (its blocks are that run's)."""
        return assembly.build(self.host, "prefix_cache", self.config.prefix_cache)

    def memory_report(self) -> dict[str, int]:
        """Device bytes held by this engine, by purpose: KV cache, slot buffers (all slots, plus any staging set),
        and the shared graph pool (where the runtime can measure it)."""
        return memory_report(self.k_cache, self.v_cache, self.pipeline, self.graphs, self.runtime)

    def _texted(self, out: Output) -> Output:
        if self.tokenizer is None or out.text is not None:
            return out
        return attrs.evolve(out, text=self.tokenizer.decode(list(out.token_ids), skip_special_tokens=True))

    def generate(self, prompts: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 request_ids: Sequence[str] | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> list[Output]:
        """Complete every prompt; returns one `Output` per prompt, in input order."""
        return self.run(self.make_requests(prompts, params, request_ids=request_ids), on_token=on_token).outputs

    def stream(self, prompts: Sequence[Any], params: SamplingParams | Sequence[SamplingParams] | None = None, *,
               request_ids: Sequence[str] | None = None) -> Iterator[TokenEvent]:
        """Yield tokens as the host learns them (the engine runs in a background thread)."""
        requests = self.make_requests(prompts, params, request_ids=request_ids)
        yield from stream_events(self.run, self.cancel, requests, forget=self._cancels.forget)

    def cancel(self, request_id: str) -> None:
        """Cancel a request (any thread): it ends with finish reason `cancelled` at the next step of its run. A
        cancel sent before its run starts applies when it starts. One for the id of a request that already ended
        in this engine (among the last `cancels.ENDED_IDS_KEPT`, 10,000) does nothing, so a late cancel cannot
        end a later request that reuses the id; to cancel that one, send the cancel once its run has started."""
        self._cancels.cancel(request_id)

    def release(self) -> None:
        """Give the model back as it was handed over: its own attention implementation, layers not compiled,
        projections not fused (their weights stay views of the fused ones: no copy). The
        engine stays usable: its next run switches the model back (that is also how engines share a model)."""
        with self._lock:
            model_state.release(self.model, self._caller_attention)

    def warmup(self, sizes: Sequence[int] | None = None, *, modes: Sequence[str] = ("greedy",)) -> int:
        """Compile and capture ahead of time, so that runs replay and never capture.

        Without `sizes`: every step shape a run can produce with the sampling paths `modes` (`greedy`, `sample`,
        `filter`) that the graph policy captures: all decode buckets up to `batch.max_seqs` and, where the attention
        backend's launch depends on padded counts only, one mixed prefill+decode shape per token bucket. With
        `sizes`: the decode buckets of those batch sizes only. Returns how many (shape, slot) pairs ran.
        """
        self._check_not_reentrant()
        # A bare string would be read letter by letter, and an unknown path failed deep in the planner
        # ("tuple.index(x): x not in tuple"): name the valid ones instead.
        if isinstance(modes, str) or not all(isinstance(m, str) and m in MODES for m in modes):
            raise ValueError(f"modes must be a list of sampling paths among {', '.join(MODES)}; got {modes!r}")
        with self._lock:
            self._bind_model()
            try:
                return self.warm.ahead(modes, {self.config.batch.pad_tokens(n) for n in sizes or ()})
            finally:
                deactivate()
                self._collector.resume()
