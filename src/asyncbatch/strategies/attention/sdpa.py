"""The reference backend: gather each sequence's blocks, then masked `scaled_dot_product_attention`.

Correct on any device and dtype, graph-capturable (all shapes come from the step's padded scalars), and slow:
it materialises every sequence's context. Use it to check the fast backends.
"""

from __future__ import annotations

from typing import Any

import attrs

from ...core.interfaces import AttentionBackend


@attrs.frozen
class SdpaConfig:
    """`static_shapes`: gather every sequence's whole block table and size the query grid by the step's padded
    token count, so the launch depends on nothing but padded counts and any mix of prefill chunks and decodes
    replays one graph. Much slower; it lets the `sim` runtime study mixed-step graphs without a GPU."""

    static_shapes: bool = False


class Sdpa(AttentionBackend):
    """Reference paged attention via gathered context and masked SDPA."""

    Config = SdpaConfig
    needs_kv_blocks = True
    auto_priority = 0  # the last resort of `auto`: runs anywhere

    def __init__(self, config: SdpaConfig | None = None) -> None:
        self.config = config or SdpaConfig()
        if self.config.static_shapes:
            self.needs_kv_blocks = False
            self.needs_max_query = False

    def forward(self, q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any, meta: Any, *, scale: float,
                sliding_window: int | None) -> Any:
        import torch
        import torch.nn.functional as F

        num_tokens, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        num_seqs = meta.seq_len.shape[0]
        nb, bs, qmax = meta.kv_blocks, meta.block_size, meta.max_query
        if self.config.static_shapes:
            nb, qmax = meta.block_table.shape[1], num_tokens
        ctx_len = nb * bs
        table = meta.block_table[:, :nb].long()
        keys = k_cache[table].reshape(num_seqs, ctx_len, kv_heads, head_dim).transpose(1, 2)
        values = v_cache[table].reshape(num_seqs, ctx_len, kv_heads, head_dim).transpose(1, 2)

        # Scatter tokens into a [seq, query-row] grid; padding tokens go to one spare row at the end.
        seq = meta.token_seq.long()
        is_real = seq >= 0
        seq_c = seq.clamp(min=0)
        row_in_seq = torch.arange(num_tokens, device=q.device) - meta.query_start.long()[seq_c]
        dest = torch.where(is_real, seq_c * qmax + row_in_seq, torch.full_like(seq, num_seqs * qmax))
        grid = q.new_zeros(num_seqs * qmax + 1, num_heads, head_dim)
        grid.index_copy_(0, dest, q)
        queries = grid[:-1].view(num_seqs, qmax, num_heads, head_dim).transpose(1, 2)

        # Position of every query row (rows past a sequence's query length attend to position 0 only).
        q_len = (meta.query_start[1:] - meta.query_start[:-1]).long()
        rows = torch.arange(qmax, device=q.device)
        q_pos = meta.seq_len.long()[:, None] - q_len[:, None] + rows[None, :]
        q_pos = torch.where(rows[None, :] < q_len[:, None], q_pos, torch.zeros_like(q_pos))
        k_pos = torch.arange(ctx_len, device=q.device)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if sliding_window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        out = F.scaled_dot_product_attention(queries, keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=mask[:, None], scale=scale, enable_gqa=num_heads != kv_heads)
        out = out.transpose(1, 2).reshape(num_seqs * qmax, num_heads, head_dim)
        out = torch.cat([out, out.new_zeros(1, num_heads, head_dim)])
        return out.index_select(0, dest)
