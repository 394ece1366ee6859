"""How attention backends plug into `transformers`: metadata, per-layer cache views, and the registered function.

asyncbatch registers one function, ``"asyncbatch"``, in the transformers attention-function registry. A model
switched to it receives no mask (transformers creates none for unknown implementations) and finds an
`AttentionContext` in its forward kwargs; the function routes each layer to the configured backend.
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
    ctx: AttentionContext | None = kwargs.get(CONTEXT_KWARG)
    if ctx is None or ctx.meta is None:
        raise RuntimeError("the asyncbatch attention implementation runs only inside an asyncbatch engine step")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by asyncbatch backends")
    layer = module.layer_idx
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    window = kwargs.get("sliding_window")
    out = ctx.backend.forward(q, k, v, ctx.k_cache[layer], ctx.v_cache[layer], ctx.meta,
                              scale=scaling if scaling is not None else q.shape[-1] ** -0.5,
                              sliding_window=window if window else None)
    return out.unsqueeze(0), None


def register_with_transformers() -> None:
    """Idempotently register the attention function with transformers (lazy import)."""
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, asyncbatch_attention)
