"""Optional `torch.compile` of the model's decoder layers.

A decode step of a transformers model is hundreds of small elementwise kernels (norms, rotary embedding,
activations, residual adds) between the matrix products; inductor fuses them. Layers share one code object, so
with parameters as graph inputs one compiled graph serves every layer. Attention stays an opaque custom op
(`asyncbatch::paged_attention`). Compiled layers are then captured in CUDA graphs by the graph policy as usual.

The model's final norm and rotary-embedding table (`model.norm`, `model.rotary_emb` in transformers' decoder
models) run once a step, outside the layers, but eagerly they are still a dozen small kernels (the rotary angles
through a float32 matrix product, then cos, sin, casts; the norm's pow, mean, rsqrt, multiplies): each is compiled
too, into one kernel or two.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import UnsupportedError

log = logging.getLogger("asyncbatch")


def _text_model(model: Any) -> Any:
    """The module holding the decoder layers: `model.<base>`, or its `language_model` in a multimodal checkpoint
    (Gemma 3, for one: `model.model.language_model.layers`)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if getattr(base, "layers", None) is None and getattr(getattr(base, "language_model", None), "layers", None) \
            is not None:
        return base.language_model
    return base


def decoder_layers(model: Any) -> Any:
    layers = getattr(_text_model(model), "layers", None)
    if layers is None:
        prefix = getattr(model, "base_model_prefix", "model")
        raise UnsupportedError(f"cannot find the decoder layers of {type(model).__name__} (expected "
                               f"model.{prefix}.layers or model.{prefix}.language_model.layers)")
    return layers


def attention_modules(model: Any) -> list[Any]:
    """The attention module of every decoder layer, in layer order (transformers convention: `self_attn`)."""
    mods = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", i) != i:
            raise UnsupportedError(f"decoder layer {i} of {type(model).__name__} has no `self_attn` with "
                                   f"layer_idx {i}; run it with `engine.compile: none`")
        mods.append(attn)
    return mods


def outer_modules(model: Any) -> list[Any]:
    """The once-a-step modules around the decoder layers that are compiled with them, where the model has them."""
    import torch

    base = _text_model(model)
    found = [getattr(base, name, None) for name in ("norm", "rotary_emb")]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def set_compiled(model: Any, compiled: bool, *, mode: str | None = None) -> None:
    """Switch the decoder layers of a (possibly shared) model to compiled or eager execution, in place.

    Engines sharing one model call this at the start of each run, so each runs the way it was configured.
    Compilation itself happens lazily, on the first step.
    """
    import torch

    if not compiled:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        layers = getattr(base, "layers", None) or []
    else:
        layers = decoder_layers(model)
    if compiled:
        attention_modules(model)  # fail now, not in the middle of a step
        # Engines differ in cache size, steps in token count: neither should trigger a recompilation.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # Compile in this process: a pool of compile workers keeps running after the compile and steals the
        # host's cores (measured on an H200 machine: 23 ms of host time per step instead of 1.5 ms, for seconds).
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        # Inductor times several launch configurations of a reduction (a norm, a softmax) on the device and keeps
        # the fastest; they sum in different orders, so timing noise chose the rounding: two runs of one bf16
        # engine in one process gave different tokens (H200, 2026-11-28). Deterministic mode keeps one by rule.
        if hasattr(inductor_config, "deterministic"):
            inductor_config.deterministic = True
    changed = 0
    outer = outer_modules(model)
    for layer in [*layers, *outer]:
        if compiled and getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=True, mode=mode)
            changed += 1
        elif not compiled and getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None
            changed += 1
    if changed:
        log.info("%s %d decoder layers of %s%s", "torch.compile:" if compiled else "eager (not compiled):",
                 len(layers), type(model).__name__, "".join(f", its {type(m).__name__}" for m in outer))
