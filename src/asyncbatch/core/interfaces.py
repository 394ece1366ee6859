"""The strategy interfaces. Each is small; each docstring is the contract between the engine and implementers.

Implementations receive their own frozen config (``cls(config, **runtime_objects)``) and nothing wider. They never
import each other; only the engine composes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedError

if TYPE_CHECKING:
    from .layout import StepShape
    from .requests import RequestState
    from .scheduling import PendingView, SchedulingState

ROLES: tuple[str, ...] = ("h2d", "compute", "d2h")


class Scheduler(ABC):
    """Chooses which requests, and how many tokens of each, go into the next batch.

    Called by the engine on the host thread, once per batch, while earlier batches may still be running on the
    device. It sees requests whose newest tokens may not be known yet: with S slots, when batch k is planned the
    host has read the tokens of batches up to k - S, and up to S - 1 batches are in flight
    (`SchedulingState.in_flight`). A request's `tokens` are the prompt plus the outputs read so far; `num_pending`
    more were sampled on the device and are not known. A scheduler does not need to care: `SchedulingState.add`
    accounts for pending tokens, KV blocks and rows. One that must see every token (stop-aware, speculative)
    asks through `needs_fresh_tokens`, at the cost of that step's overlap.

    A scheduler must not import torch, touch streams or events, block, or mutate requests other than through
    `state.add`. Any scheduler therefore runs unchanged under every buffer policy, stream topology and graph
    policy.
    """

    @abstractmethod
    def schedule(self, state: SchedulingState) -> None:
        """Fill the batch by calling `state.add(request, num_tokens)` for requests in `state.running` (admitted)
        and `state.waiting` (arrived, not admitted). `add` returns False when something does not fit."""

    def needs_fresh_tokens(self, view: PendingView) -> bool:
        """Whether the host must read every in-flight token before this batch is planned.

        Called by the pipeline on the host thread before each batch, only while earlier batches are in flight
        (never in the synchronous loop). Returning True makes the host wait for all of them and apply their
        tokens, so `schedule` then sees `num_pending == 0` everywhere; the device idles while the host plans, so
        each True costs about one step of overlap. The default never asks. Must be cheap, and must not block or
        mutate anything.
        """
        return False

    def preemption_victim(self, candidates: Sequence[RequestState]) -> RequestState:
        """Which running request gives up its KV blocks when the cache is full (it is recomputed later).

        Called by the engine only with a non-empty list. The default preempts the most recently admitted one,
        so the oldest request always makes progress.
        """
        return max(candidates, key=lambda r: r.admit_order)


class BufferPolicy(ABC):
    """How many input/output slots exist, so how far the host may run ahead of the device.

    Each slot holds one batch's host inputs, device inputs, device outputs and host outputs. The engine prepares
    batch k into slot `slot_for(k)` and updates batch k - `num_slots` + 1 after launching k, so the host runs up to
    `num_slots - 1` batches ahead. One slot is the synchronous loop.
    """

    @property
    @abstractmethod
    def num_slots(self) -> int:
        """Number of slots (>= 1). Constant for the engine's lifetime."""

    def slot_for(self, batch_index: int) -> int:
        """The slot batch `batch_index` uses. Must cycle through all slots in order (the event edges assume
        that batch k reuses the slot of batch k - num_slots)."""
        return batch_index % self.num_slots


class StreamTopology(ABC):
    """Maps the roles `h2d`, `compute`, `d2h` onto device streams.

    Called once when the engine is built. Correctness never depends on the mapping: every edge between ops is an
    event, so sharing a stream only removes concurrency.
    """

    @property
    @abstractmethod
    def streams(self) -> tuple[str, ...]:
        """The distinct stream names to create."""

    @abstractmethod
    def stream_for(self, role: str) -> str:
        """The stream that runs `role` (one of `ROLES`)."""


class GraphContext(ABC):
    """What the engine gives a graph policy: the compute body, slot buffers, and capture.

    `static_mixed` tells whether steps holding prefill chunks have a bounded set of shapes (the attention
    backend's launch depends only on padded counts): only then can they be captured ahead of a run.
    """

    static_mixed: bool = False

    @abstractmethod
    def body(self, slot_buffers: Any, shape: StepShape) -> None:
        """Run one step eagerly: read device inputs of `slot_buffers`, write its device outputs."""

    @abstractmethod
    def slot_buffers(self, slot: int) -> Any:
        """The device buffers of `slot`."""

    @abstractmethod
    def new_buffers(self) -> Any:
        """Allocate one more device buffer set (same layout as a slot's)."""

    @abstractmethod
    def copy_buffers(self, src: Any, dst: Any, *, inputs: bool) -> None:
        """Device-to-device copy of inputs (or outputs) between buffer sets, on the current stream."""

    @abstractmethod
    def capture(self, fn: Callable[[], None]) -> Any:
        """Capture `fn` into a graph in the shared pool; returns a handle with `replay()`, or None if the
        runtime has no graphs (the policy must then run eagerly)."""


class GraphPolicy(ABC):
    """Whether and how the compute step is captured as a graph.

    `run` is called inside the compute op of every batch, on the compute stream. It must produce exactly what
    `ctx.body(ctx.slot_buffers(slot), shape)` would. A captured graph bakes in buffer addresses and the Python
    scalars of `shape`, so graphs must be keyed by the whole shape (and slot, where addresses differ).
    """

    @abstractmethod
    def bind(self, ctx: GraphContext) -> None:
        """Called once by the engine before the first step."""

    @abstractmethod
    def run(self, slot: int, shape: StepShape) -> bool:
        """Execute the step for `slot`; return True if it replayed a graph."""

    def uses_graph(self, shape: StepShape) -> bool:
        """Whether `run` would capture or replay a graph for this shape. Called on the host before launch (graph
        replays sharing the pool must be ordered by an event)."""
        return False

    def resources(self, slot: int) -> list[tuple[Any, str]]:
        """Extra shared buffers a step touches (e.g. the graph pool), for the `sim` checker."""
        return []

    def num_graphs(self) -> int:
        return 0


class AttentionBackend(ABC):
    """Paged attention over the KV cache, called once per layer per step from inside the model.

    Must first write the step's new K/V into the cache at `meta.slot_mapping`, then compute, for every token t
    with `meta.token_seq[t] >= 0`, causal attention over positions `<= meta.positions[t]` of its sequence (found
    through `meta.block_table`), honouring `sliding_window`. Padded tokens may produce anything finite. Must be
    capturable in a graph given the same `meta` addresses: no host synchronisation, no data-dependent shapes
    beyond the scalars in `meta`.
    """

    #: Whether the launch depends on the padded context length (then `StepShape.kv_blocks` is part of graph keys).
    needs_kv_blocks: bool = False
    #: Whether the launch of a step holding prefill chunks depends on its longest query (`StepShape.max_query`,
    #: then part of graph keys). A backend that reads query lengths on the device and sizes its launch from the
    #: padded token and sequence counts alone sets False; with `needs_kv_blocks` also False, every mix of prefill
    #: chunks and decodes with the same padded token count replays one graph, so mixed steps can be captured
    #: ahead of time (see `has_static_launch`).
    needs_max_query: bool = True
    #: Rank for `attention: auto` (highest available wins); None never takes part in `auto`.
    auto_priority: int | None = None
    #: Whether `forward` also takes `rotary=(cos, sin)` ([T, D] rows of the model's rotary embedding) with q and k
    #: not yet rotated, and then computes what transformers' `apply_rotary_pos_emb` followed by `forward` would,
    #: rotated keys in the cache included (`engine.fuse_rotary`). Only backends that set it are ever given `rotary`.
    applies_rotary: bool = False

    @abstractmethod
    def forward(self, q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any, meta: Any, *, scale: float,
                sliding_window: int | None) -> Any:
        """q [T, Hq, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> output [T, Hq, D]."""

    @property
    def has_static_launch(self) -> bool:
        """True when a step's launch depends only on its padded token count, sequence count and sampling path."""
        return not self.needs_kv_blocks and not self.needs_max_query

    def make_batch_invariant(self) -> None:
        """Called once at engine build, before `check`, when `engine.batch_invariant` is on: from now on a token's
        output must depend only on its own sequence (same bits whatever shares the step, decode or mixed, padded
        to any count). Raise `UnsupportedError` with the reason if this backend has no such mode."""
        raise UnsupportedError(f"attention backend {type(self).__name__} has no batch-invariant mode (use "
                               "engine.attention: triton)")

    def check(self, device: Any, dtype: Any, head_dim: int, block_size: int) -> None:
        """Called once at engine build. Raise `UnsupportedError` with the reason if this backend cannot run
        here (no such device, dtype, head size or KV block size); the message is shown to the user."""

    def use_dependent_launch(self, on: bool) -> None:
        """Called once at engine build, after `check`, with `on` true where `engine.pdl` is on (a device of
        compute capability >= 9.0). A backend may then launch its kernels as programmatic dependent launches;
        each program of such a kernel must wait for its predecessor (`griddepcontrol.wait`) before it reads or
        writes memory and before it exits. Ignoring the call is always correct."""


class PrefixCache(ABC):
    """An index of full KV blocks by their token content, so that requests sharing a prefix share its blocks.

    Called by the engine's block manager (`core.kv_blocks`) only, on the host thread, between device launches.
    A block is keyed by the tokens it holds *and* every token before it: `keys[i]` is the tuple of block i's
    `block_size` token ids, and a block is found only through the blocks before it. The index does not own
    memory and never decides when a block may be reused: the block manager counts the requests holding each
    cached block and the last batch that read it, and asks the index which blocks to drop only among those no
    request holds and no batch in flight reads (`set_evictable`). An index must not return a block from `match`
    after it returned it from `evict`, and must not hand out anything it was not given by `insert`.
    """

    @abstractmethod
    def match(self, keys: Sequence[tuple[int, ...]]) -> list[int]:
        """The blocks of the longest cached prefix of `keys` (block 0's key first). May refresh recency; must not
        change what is cached."""

    @abstractmethod
    def insert(self, keys: Sequence[tuple[int, ...]], blocks: Sequence[int]) -> list[bool]:
        """Offer `blocks[i]` as the block of prefix `keys[:i+1]`, for every i. Returns, per block, whether the
        index now holds that block. A prefix it already holds under another block keeps that block; the offered
        one stays private, and nothing after it is inserted (False for the rest): a cached block's parent is
        always a block its holders hold."""

    @abstractmethod
    def set_evictable(self, block: int, evictable: bool) -> None:
        """Whether a held block may be chosen by `evict`: True once no request holds it and no batch in flight
        reads it, False again when a request takes it."""

    @abstractmethod
    def evict(self, n: int) -> list[int]:
        """Drop `n` evictable blocks (fewer only if fewer are evictable), in the index's order of preference, and
        return them; they are forgotten: `match` no longer finds them or anything only reachable through them. The
        block manager makes a block evictable only when every block cached after it on a prefix is evictable
        too, so an index that drops leaves first always finds `n`."""
