"""RMSNorms and residual adds folded into the decode GEMMs around them (`engine.fold_norms`).

Between the matrix products of a decode step, a pre-norm decoder layer runs three small kernels of its own: the
input RMSNorm, the residual add with the post-attention RMSNorm, and the residual add after the MLP. At batch 32 on
an 8B Llama each is a few microseconds of launch and ramp-up for a few hundred KiB: about 0.2 ms of a 5 ms step.
They can all go, because an RMSNorm commutes with the product that follows it:

    (gamma * x / rms(x)) W^T = ((x * gamma) W^T) / rms(x)

so the product before the norm writes, in its epilogue, the residual sum h, the numerator g = h * gamma and each
of its column strips' share of sum(h^2); the product after it multiplies by g and divides each row by
rms(h) = sqrt(sum / hidden + eps) in its own epilogue, having summed the strips in a fixed order. The weights are
never touched, so nothing needs undoing but the swap itself.

The layer's own forward cannot say this, so a folded layer runs `folded_forward` instead, which still calls the
model's attention and MLP modules (rotary, q/k norms, the attention backend and the activation stay theirs):

* the input norm's numerator comes from the previous layer's down projection, handed over through the model's
  `_Carrier` when the layer is called with that very tensor (layer 0, or any other caller, computes it itself);
* the fused q/k/v and gate/up groups (`fusion`) divide by the rms (`_Group.row_scale`);
* o_proj and down_proj become `OutputProjection`s whose epilogue adds the residual (`asyncbatch::residual_linear`).

Only what is known to be this shape is folded: the Llama, Mistral and Qwen2/3 decoder layers, with their RMSNorm,
fused projections and the `tma` decode GEMM on o_proj and down_proj (under tensor parallelism those are
row-parallel and their partial sums meet after the product, so nothing is folded). Steps of more rows than the
kernel takes run the layer's own forward, so prefill and large batches keep inductor's fused norms. The rounding
differs from the unfolded layer's (the norm's scale is applied after the product, in float32), like any kernel
change within bf16; the residual sums are rounded exactly as transformers rounds them.
"""

from __future__ import annotations

import logging
import types
from typing import Any

log = logging.getLogger("asyncbatch")

FOLDABLE_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})
MAX_ROWS = 32  # `decode_gemm_tma.MAX_ROWS`, without importing triton here


class _Carrier:
    """The next layer's input norm's numerator, left by a layer's down projection: (h, g, sq) or all None."""

    h: Any = None
    g: Any = None
    sq: Any = None


class _Fold:
    """What a folded layer's forward needs beside its modules; one per layer, shared carrier per model."""

    def update(self, layer: Any, carrier: _Carrier, gamma_next: Any, pdl: bool) -> None:
        self.carrier, self.pdl = carrier, pdl
        self.eps_in = float(layer.input_layernorm.variance_epsilon)
        self.eps_post = float(layer.post_attention_layernorm.variance_epsilon)
        self.gamma_next = gamma_next  # the next layer's input norm's weight; None in the last layer
        self.qkv = layer.self_attn.q_proj.group
        self.gate = layer.mlp.gate_proj.group


def _output_class() -> type:
    import torch

    class OutputProjection(torch.nn.Module):
        """o_proj or down_proj of a folded layer: its `inner` module's product, plus, for the one call after the
        layer set `epilogue` = (residual, next gamma or None), the residual add and the next norm's numerator
        (left in `stash`)."""

        def __init__(self, inner: Any, pdl: bool) -> None:
            super().__init__()
            self.inner, self.pdl = inner, pdl
            self.epilogue: tuple[Any, Any] | None = None
            self.stash: tuple[Any, Any] | None = None

        def forward(self, x: Any) -> Any:
            epilogue = self.epilogue
            if epilogue is None:
                return self.inner(x)
            from .norm_fold_ops import ops

            self.epilogue = None
            h, g, sq = ops()["residual_linear"](x, self.inner.weight, self.inner.bias, epilogue[0], epilogue[1],
                                                self.pdl)
            self.stash = (g, sq)
            return h

    return OutputProjection


_CLASS: type | None = None


def _output_cls() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = _output_class()
    return _CLASS


def _output(inner: Any, pdl: bool) -> Any:
    """`inner`'s `OutputProjection`, the same object at every swap."""
    out = inner.__dict__.get("_asyncbatch_output")
    if out is None:
        out = _output_cls()(inner, pdl)
        inner.__dict__["_asyncbatch_output"] = out
    out.pdl = pdl
    return out


def folded_forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """A folded layer's forward (bound to the layer): the layer's own arithmetic, with norms and residual adds in
    the products' epilogues. Falls back to the layer's class forward where the decode kernel does not apply."""
    fold = self._asyncbatch_fold
    carrier = fold.carrier
    rows = hidden_states.numel() // hidden_states.shape[-1]
    if args or rows > MAX_ROWS or not hidden_states.is_contiguous():
        carrier.h = carrier.g = carrier.sq = None
        return type(self).forward(self, hidden_states, *args, **kwargs)
    from .norm_fold_ops import numerator

    if carrier.h is hidden_states:
        g, sq = carrier.g, carrier.sq
    else:
        g, sq = numerator(hidden_states, self.input_layernorm.weight)
    carrier.h = carrier.g = carrier.sq = None
    o_proj, down_proj = self.self_attn.o_proj, self.mlp.down_proj
    fold.qkv.row_scale = (sq, fold.eps_in, fold.pdl)
    o_proj.epilogue = (hidden_states, self.post_attention_layernorm.weight)
    h, _ = self.self_attn(hidden_states=g, **kwargs)
    g, sq = o_proj.stash
    o_proj.stash = fold.qkv.row_scale = None
    fold.gate.row_scale = (sq, fold.eps_post, fold.pdl)
    down_proj.epilogue = (h, fold.gamma_next)
    out = self.mlp(g)
    fold.gate.row_scale = None
    if fold.gamma_next is not None:
        carrier.h = out
        carrier.g, carrier.sq = down_proj.stash
    down_proj.stash = None
    return out


def unsupported_reason(model: Any) -> str | None:
    """Why the layers of `model` (fused, with decode GEMM twins in place) cannot be folded; None when they can."""
    from .compile import decoder_layers
    from .errors import UnsupportedError
    from .invariant import _is_llama_rms_norm

    try:
        layers = list(decoder_layers(model))
    except UnsupportedError as exc:
        return str(exc)
    for i, layer in enumerate(layers):
        name = type(layer).__name__
        if name not in FOLDABLE_LAYERS:
            return f"{name} is not a decoder layer of known shape (folded: {', '.join(sorted(FOLDABLE_LAYERS))})"
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if not all(_is_llama_rms_norm(n) for n in norms):
            return f"layer {i}'s norms are not the Llama RMSNorm"
        attn, mlp = layer.self_attn, layer.mlp
        for parent, first in ((attn, "q_proj"), (mlp, "gate_proj")):
            if type(getattr(parent, first, None)).__name__ != "FusedProjection":
                return f"layer {i}'s {first} is not a fused projection group (engine.fuse_projections)"
        for parent, name_ in ((attn, "o_proj"), (mlp, "down_proj")):
            module = getattr(parent, name_, None)
            if type(module) is _output_cls():
                module = module.inner
            if type(module).__name__ != "DecodeLinear" or module.kernel != "tma":
                return f"layer {i}'s {name_} is a {type(module).__name__}, not the tma decode GEMM " \
                       "(engine.decode_gemm: tma; not under tensor parallelism)"
    return None


def set_norm_fold(model: Any, on: bool, pdl: bool = False) -> int:
    """Fold (or unfold) every decoder layer of `model` in place; returns how many layers changed. Idempotent.
    `on` needs `unsupported_reason(model)` to be None (ValueError otherwise): call it after fusion and the decode
    GEMM swap, and unfold before undoing either."""
    from .compile import decoder_layers

    if on:
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"cannot fold the norms of {type(model).__name__}: {reason}")
        from .norm_fold_ops import ops

        ops()
    cls = _output_cls()
    layers = list(decoder_layers(model)) if on else [m for m in model.modules() if "forward" in m.__dict__
                                                      and "_asyncbatch_fold" in m.__dict__]
    # The same carrier, folds and output modules at every swap: compiled layers guard on the objects they touch.
    carrier = model.__dict__.setdefault("_asyncbatch_carrier", _Carrier())
    changed = 0
    for i, layer in enumerate(layers):
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            module = getattr(parent, name)
            if on and type(module) is not cls:
                setattr(parent, name, _output(module, pdl))
            elif on:
                module.pdl = pdl
            elif type(module) is cls:
                setattr(parent, name, module.inner)
        if on:
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else None
            fold = layer.__dict__.setdefault("_asyncbatch_fold", _Fold())
            fold.update(layer, carrier, None if after is None else after.weight, pdl)
            changed += "forward" not in layer.__dict__
            layer.forward = types.MethodType(folded_forward, layer)
        else:
            del layer.forward
            changed += 1
    if changed:
        log.info("%s the RMSNorms and residual adds of %d decoder layers of %s", "folded" if on else "unfolded",
                 changed, type(model).__name__)
    return changed
