"""How attention backends plug into `transformers`: metadata, per-layer cache views, and the registered function.

asyncbatch registers one function, ``"asyncbatch"``, in the transformers attention-function registry. A model
switched to it receives no mask (transformers creates none for unknown implementations) and finds an
`AttentionContext` in its forward kwargs; the function routes each layer to the configured backend. Layers whose
rotation the backend applies itself (`rotary_fold`) call `rotary_attention` instead, with q and k unrotated.
"""

from __future__ import annotations

from typing import Any

import attrs

ATTN_IMPLEMENTATION = "asyncbatch"
CONTEXT_KWARG = "asyncbatch_ctx"


@attrs.define
class AttentionMetadata:
    """Device views describing one packed, padded step (see `layout`). Fixed addresses across replays.

    token-indexed [T]: `positions`, `slot_mapping` (flat cache slot each new K/V goes to), `token_seq` (-1 pads)
    sequence-indexed [B]: `seq_len` (context after this step; 0 pads), `query_start` [B+1], `block_table` [B, NB]
    `max_query` and `kv_blocks` are the padded scalars of the step's `StepShape`.
    """

    positions: Any
    slot_mapping: Any
    token_seq: Any
    seq_len: Any
    query_start: Any
    block_table: Any
    max_query: int
    kv_blocks: int
    block_size: int


@attrs.define
class AttentionContext:
    """Passed through the model's forward kwargs to every attention layer."""

    backend: Any
    k_cache: list  # per layer [num_blocks, block_size, kv_heads, head_dim]
    v_cache: list
    meta: AttentionMetadata | None = None


def asyncbatch_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                         scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """The function registered as ``"asyncbatch"``: query [1, Hq, T, D] -> output [1, T, Hq, D]."""
    ctx = _context(kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by asyncbatch backends")
    if kwargs.get("s_aux") is not None:  # refused when the model is prepared; a layer added later still fails here
        raise NotImplementedError("attention sinks are not supported by asyncbatch backends")
    import torch

    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    window = kwargs.get("sliding_window") or None
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        # Compiled layers: attention is an opaque custom op that finds the caches and the step metadata in the
        # active context; the layer index arrives as a (CPU) buffer. No Python int, cache shape or object reaches
        # the compiled graph's guards, so one graph serves every layer, engine and cache size.
        out = _OP(q, k, v, module._asyncbatch_layer, scale, window or 0)
    else:
        layer = module.layer_idx
        out = ctx.backend.forward(q, k, v, ctx.k_cache[layer], ctx.v_cache[layer], ctx.meta, scale=scale,
                                  sliding_window=window)
    return out.unsqueeze(0), None


def rotary_attention(module: Any, q: Any, k: Any, v: Any, rotary: tuple[Any, Any], *, scaling: float,
                     window: int | None, **kwargs: Any) -> Any:
    """Attention of the step's q [T, Hq, D], k, v [T, Hkv, D] before the rotary embedding, for a backend that
    `applies_rotary` (`rotary_fold`): `rotary` = (cos, sin) [T, D]. Returns [T, Hq, D]."""
    import torch

    ctx = _context(kwargs)
    cos, sin = rotary
    if torch.compiler.is_compiling():  # see `asyncbatch_attention`
        return _rotary_op()(q, k, v, cos, sin, module._asyncbatch_layer, scaling, window or 0)
    layer = module.layer_idx
    return ctx.backend.forward(q, k, v, ctx.k_cache[layer], ctx.v_cache[layer], ctx.meta, scale=scaling,
                               sliding_window=window, rotary=(cos, sin))


def _context(kwargs: dict[str, Any]) -> AttentionContext:
    """The step's context: passed through the forward kwargs, else the engine's active one."""
    ctx: AttentionContext | None = kwargs.get(CONTEXT_KWARG) or (_ACTIVE[0] if _ACTIVE else None)
    if ctx is None:
        raise RuntimeError("the asyncbatch attention implementation runs only inside an asyncbatch engine step")
    return ctx


def apply_rotary(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    """transformers' rotary embedding of q [T, Hq, D] and k [T, Hkv, D] by cos, sin [T, D'] (D' <= D: the first D'
    features rotate, as in partial-rotary models), in float32 (or wider) and rounded once, as its compiled form
    rounds."""
    import torch

    def rotate(x: Any) -> Any:
        n, wide = cos.shape[-1], torch.promote_types(x.dtype, torch.float32)
        r, rest = x[..., :n].to(wide), x[..., n:]
        half = torch.cat((-r[..., n // 2:], r[..., : n // 2]), dim=-1)
        out = (r * cos[:, None].to(wide) + half * sin[:, None].to(wide)).to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    return rotate(q), rotate(k)


_ACTIVE: list[AttentionContext] = []
_OP: Any = None
_ROTARY_OP: Any = None


def activate(ctx: AttentionContext, attention_modules: list[Any]) -> None:
    """Make `ctx` the context compiled layers use, and give each attention module its layer index as a buffer.

    Called by an engine with compiled layers at the start of every run, so engines sharing a model take turns.
    """
    import torch

    _paged_attention_op()  # register the ops here: creating one inside a compiled region would break the graph
    _rotary_op()
    for layer, module in enumerate(attention_modules):
        if "_asyncbatch_layer" not in module._buffers:
            module.register_buffer("_asyncbatch_layer", torch.tensor(layer), persistent=False)
    _ACTIVE[:] = [ctx]


def use_context(ctx: AttentionContext) -> None:
    """Make `ctx` the fallback context of eager layers too: some decoder layers (StableLM's, for one) call their
    attention without passing on the forward kwargs that carry it. Called by every engine at the start of a run."""
    _ACTIVE[:] = [ctx]


def deactivate() -> None:
    """Forget the active context at the end of a run (it holds the engine's KV cache alive)."""
    _ACTIVE.clear()


def _paged_attention_op() -> Any:
    """`asyncbatch::paged_attention`, registered on first use: the active backend as a custom op that mutates the
    caches, with a shape-only fake implementation for tracing."""
    global _OP
    if _OP is not None:
        return _OP
    import torch

    # The caches it writes are invisible to the compiled graph, which never reads them: nothing to order.
    schema = "(Tensor q, Tensor k, Tensor v, Tensor layer, float scale, int window) -> Tensor"

    @torch.library.custom_op("asyncbatch::paged_attention", mutates_args=(), schema=schema)
    def paged_attention(q, k, v, layer, scale, window):  # noqa: ANN001, ANN202
        ctx = _ACTIVE[0]
        i = int(layer)  # a CPU scalar: no device synchronisation, also during graph capture
        return ctx.backend.forward(q, k, v, ctx.k_cache[i], ctx.v_cache[i], ctx.meta, scale=scale,
                                   sliding_window=window or None)

    @paged_attention.register_fake
    def _(q, k, v, layer, scale, window):  # noqa: ANN001, ANN202
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    _OP = paged_attention
    return _OP


def _rotary_op() -> Any:
    """`asyncbatch::paged_attention_rotary`: `asyncbatch::paged_attention` for q and k not yet rotated, given the
    step's cos and sin rows (registered on first use, see `activate`)."""
    global _ROTARY_OP
    if _ROTARY_OP is not None:
        return _ROTARY_OP
    import torch

    schema = "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor layer, float scale, int window) -> Tensor"

    @torch.library.custom_op("asyncbatch::paged_attention_rotary", mutates_args=(), schema=schema)
    def paged_attention_rotary(q, k, v, cos, sin, layer, scale, window):  # noqa: ANN001, ANN202
        ctx = _ACTIVE[0]
        i = int(layer)
        return ctx.backend.forward(q, k, v, ctx.k_cache[i], ctx.v_cache[i], ctx.meta, scale=scale,
                                   sliding_window=window or None, rotary=(cos, sin))

    @paged_attention_rotary.register_fake
    def _(q, k, v, cos, sin, layer, scale, window):  # noqa: ANN001, ANN202
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    _ROTARY_OP = paged_attention_rotary
    return _ROTARY_OP


def register_with_transformers() -> None:
    """Idempotently register the attention function with transformers (lazy import)."""
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, asyncbatch_attention)
