"""Optional `torch.compile` of the model's decoder layers.

A decode step of a transformers model is hundreds of small elementwise kernels (norms, rotary embedding,
activations, residual adds) between the matrix products; inductor fuses them. Layers share one code object, so
with parameters as graph inputs one compiled graph serves every layer. Attention stays an opaque custom op
(`asyncbatch::paged_attention`). Compiled layers are then captured in CUDA graphs by the graph policy as usual.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import UnsupportedError

log = logging.getLogger("asyncbatch")


def decoder_layers(model: Any) -> Any:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedError(f"cannot find the decoder layers of {type(model).__name__} (expected "
                               f"model.{getattr(model, 'base_model_prefix', 'model')}.layers) to compile them")
    return layers


def attention_modules(model: Any) -> list[Any]:
    """The attention module of every decoder layer, in layer order (transformers convention: `self_attn`)."""
    mods = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", i) != i:
            raise UnsupportedError(f"decoder layer {i} of {type(model).__name__} has no `self_attn` with "
                                   "layer_idx {i}; compile it with `compile: none`")
        mods.append(attn)
    return mods


def compile_layers(model: Any, *, mode: str | None = None) -> int:
    """Compile every decoder layer in place (idempotent). Returns how many layers are compiled."""
    layers = decoder_layers(model)
    attention_modules(model)  # fail now, not in the middle of a step
    count = 0
    for layer in layers:
        if not getattr(layer, "_asyncbatch_compiled", False):
            layer.compile(dynamic=True, mode=mode)
            layer._asyncbatch_compiled = True
        count += 1
    log.info("torch.compile: %d decoder layers of %s (mode %s)", count, type(model).__name__, mode or "default")
    return count
