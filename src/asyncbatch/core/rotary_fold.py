"""The rotary position embedding applied inside the attention kernels (`engine.fuse_rotary`).

A transformers attention layer rotates q and k with its own small kernels between the q/k/v product and attention:
at batch 32 on an 8B Llama two per layer, 64 launches and about 80 us of a 5 ms decode step on an H200. A backend
that `applies_rotary` (the `triton` one) rotates them itself where it loads them anyway: q as the attention kernel
reads it, the new K on its way into the cache. Nothing else changes: the model's rotary module still computes the
step's cos and sin once (so every RoPE variant, scaled or dynamic, keeps its own frequencies), and the cache holds
rotated keys as before.

The layer's own forward cannot leave the rotation out, so each attention module of a known family runs
`rotary_forward` instead: the same projections (and Qwen3's q/k norms), the backend given the cos and sin rows, the
same output projection. No weight is touched, and `set_rotary_fused(model, False)` puts the class forward back. Anything the replacement does not handle (a transformers cache object, a batch of more than one
packed sequence, positional extras) runs the class forward. Under tensor parallelism the layers keep their rotary
kernels for now: the fused rotation has not yet been verified on several GPUs.
"""

from __future__ import annotations

import logging
import types
from typing import Any

log = logging.getLogger("asyncbatch")

FAMILIES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _window(attn: Any) -> int | None:
    """The sliding window the class forward hands the attention function (Mistral reads its config; Qwen2/3 keep a
    per-layer attribute; Llama has none)."""
    if type(attn).__name__.startswith("Mistral"):
        return getattr(attn.config, "sliding_window", None)
    return getattr(attn, "sliding_window", None)


def rotary_forward(self: Any, hidden_states: Any, position_embeddings: Any = None, attention_mask: Any = None,
                   *args: Any, **kwargs: Any) -> Any:
    """An attention module's forward (bound to it) with the rotation left to the backend."""
    lead = hidden_states.shape[:-1]
    if (position_embeddings is None or args or len(lead) != 2 or lead[0] != 1
            or any(kwargs.get(name) is not None for name in _CACHE_KWARGS)):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    from .attention_api import rotary_attention

    for name in _CACHE_KWARGS:
        kwargs.pop(name, None)
    shape = (*lead, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape)
    if "q_norm" in self._modules:  # Qwen3 normalises each head before the rotation
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    out = rotary_attention(self, q[0], k[0], v[0], (cos[0], sin[0]), scaling=self.scaling, window=_window(self),
                           **kwargs)
    return self.o_proj(out.reshape(*lead, -1)), None


def unsupported_reason(model: Any, backend: Any, name: str | None = None) -> str | None:
    """Why the rotation of `model`'s layers cannot move into `backend` (`name`: as the configuration names it);
    None when it can."""
    from .compile import attention_modules
    from .errors import UnsupportedError

    if not getattr(backend, "applies_rotary", False):
        return f"the attention backend {name or type(backend).__name__!r} does not apply the rotary embedding " \
               "itself (engine.attention: triton does)"
    try:
        modules = attention_modules(model)
    except UnsupportedError as exc:
        return str(exc)
    for i, attn in enumerate(modules):
        name = type(attn).__name__
        if name not in FAMILIES:
            return f"layer {i}'s attention is a {name}, not one of known shape ({', '.join(sorted(FAMILIES))})"
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return f"layer {i}'s {name} lacks the projections or scalars of its family"
        if type(attn.o_proj).__name__ == "RowParallelLinear":
            # Nothing in the sharding contradicts it, but it has not run on several GPUs yet: kept off until it has.
            return "the layers are sharded for tensor parallelism, where the fused rotation is not yet verified"
    return None


def set_rotary_fused(model: Any, on: bool) -> int:
    """Switch every attention module of `model` to `rotary_forward` (or back) in place; returns how many changed.
    Idempotent. `on` needs `unsupported_reason` to be None for the engine's backend (the caller checks)."""
    from .compile import attention_modules

    if on:
        modules = attention_modules(model)
    else:
        modules = [m for m in model.modules() if "_asyncbatch_rotary" in m.__dict__]
    changed = 0
    for attn in modules:
        if on and "_asyncbatch_rotary" not in attn.__dict__:
            attn.__dict__["_asyncbatch_rotary"] = True
            attn.forward = types.MethodType(rotary_forward, attn)
            changed += 1
        elif not on:
            del attn.__dict__["_asyncbatch_rotary"]
            del attn.forward
            changed += 1
    if changed:
        log.info("%s the rotary embedding of %d attention layers of %s", "fused" if on else "unfused", changed,
                 type(model).__name__)
    return changed
