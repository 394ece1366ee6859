"""FlashAttention over the paged cache, with no mask tensor: the flash-attn package's paged varlen kernel when it
is installed, else torch's own varlen FlashAttention with a block table (torch >= 2.13). CUDA only.

Both kernels bake `max_seqlen_q` / `max_seqlen_k` into the launch, so this backend makes `StepShape.kv_blocks`
part of the graph key.
"""

from __future__ import annotations

import inspect
from typing import Any

import attrs

from ...core.errors import UnsupportedError
from ...core.interfaces import AttentionBackend


@attrs.frozen
class FlashConfig:
    """`implementation`: `auto` (flash-attn package if importable, else torch varlen), `flash_attn` or `torch`."""

    implementation: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "flash_attn", "torch")))


def _flash_attn() -> Any:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "block_table" in inspect.signature(varlen_attn).parameters else None


class Flash(AttentionBackend):
    """Paged FlashAttention (flash-attn package or torch varlen with a block table)."""

    Config = FlashConfig
    needs_kv_blocks = True
    auto_priority = 100

    def __init__(self, config: FlashConfig | None = None) -> None:
        self.config = config or FlashConfig()
        self._impl: str | None = None
        self._fn: Any = None

    def check(self, device: Any, dtype: Any, head_dim: int, block_size: int) -> None:
        import torch

        if device.type != "cuda":
            raise UnsupportedError("flash attention needs a CUDA device")
        if dtype not in (torch.float16, torch.bfloat16):
            raise UnsupportedError(f"flash attention needs float16 or bfloat16, the model is {dtype}")
        want = self.config.implementation
        reasons = []
        if want in ("auto", "flash_attn"):
            fn = _flash_attn()
            if fn is None:
                reasons.append("the flash-attn package is not installed (pip install 'asyncbatch[flash-attn]')")
            elif block_size % 256:
                reasons.append(f"flash-attn's paged kernel needs cache.block_size % 256 == 0, got {block_size}")
            else:
                self._impl, self._fn = "flash_attn", fn
                return
        if want in ("auto", "torch"):
            fn = _torch_varlen()
            if fn is None:
                reasons.append(f"torch {torch.__version__} has no varlen_attn with block_table (needs >= 2.13)")
            else:
                self._impl, self._fn = "torch", fn
                return
        raise UnsupportedError("; ".join(reasons))

    def forward(self, q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any, meta: Any, *, scale: float,
                sliding_window: int | None) -> Any:
        import torch

        kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        seq_len = meta.seq_len
        cu_k = torch.nn.functional.pad(torch.cumsum(seq_len, 0, dtype=torch.int32), (1, 0))
        max_k = meta.kv_blocks * meta.block_size
        left = sliding_window - 1 if sliding_window else -1
        table = meta.block_table[:, : meta.kv_blocks]
        if self._impl == "flash_attn":
            out = self._fn(q, k_cache, v_cache, meta.query_start, cu_k, meta.max_query, max_k,
                           softmax_scale=scale, causal=True, window_size=(left, 0), block_table=table)
        else:
            out = self._fn(q, k_cache, v_cache, meta.query_start, cu_k, meta.max_query, max_k, scale=scale,
                           window_size=(left, 0), enable_gqa=q.shape[1] != kv_heads, seqused_k=seq_len,
                           block_table=table)
        return torch.where((meta.token_seq >= 0)[:, None, None], out, torch.zeros_like(out))
