"""Which transformers models the engine computes exactly, refused before anything runs where it would not.

The engine runs a model's own forward with one attention function (`attention_api`) over a paged KV cache, and
keeps no other state between steps. A model whose layers need more than that would produce wrong tokens without
an error, so it is refused with the reason, from its config where possible (before any weight is read):

* layers that are not attention: recurrent, convolutional or linear-attention layers (`layer_types` such as
  `linear_attention`, `conv`, `mamba`), whose state would be lost between steps; a model with no attention heads;
* attention the backends do not compute: logit soft-capping (Gemma 2), chunked local attention (Llama 4),
  multi-head latent attention (DeepSeek V2/V3: keys and values of other widths than `head_dim`), attention
  sinks (GPT-OSS, found on the loaded modules), and bidirectional attention (an encoder such as BERT or RoBERTa
  loaded as a causal LM without `is_decoder: true`, found on the loaded modules);
* layers that call attention more than once per step for one KV cache: differential attention (DiffLlama: two
  calls over halves of the values) and looped layers (Dory: the recurrent block runs several times per token,
  each loop with a cache of its own).

`max_positions` gives the longest sequence a model computes the same way whatever shares its batch: LongRoPE
(Phi-3 and Phi-4 long-context checkpoints) picks its rotary frequencies from the longest position in the packed
step, so past `original_max_position_embeddings` a request's tokens would depend on its neighbours. Dynamic NTK
RoPE (`rope_type: dynamic`) is the plain RoPE up to `max_position_embeddings`; past it transformers rescales the
frequencies to the longest position of the forward call and keeps them for later calls, so a token depends on
what shares its step, on later tokens of its own chunk and on earlier steps: no per-sequence result exists to
match, and sequences stop at `max_position_embeddings` (its `factor` is not applied).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("asyncbatch")

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention"})
_STATEFUL_MODULES = ("Mamba", "Mixer", "GatedDeltaNet", "ShortConv", "LinearAttention", "RWKV")  # class-name fragments


def text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def config_unsupported(config: Any) -> str | None:
    """Why the engine cannot run a model of this transformers config exactly; None when it can."""
    c = text_config(config)
    name = type(config).__name__.removesuffix("Config") or "this model"
    if not getattr(c, "num_attention_heads", None):
        return f"{name} has no attention heads (num_attention_heads): not an attention model"
    kinds = set(getattr(c, "layer_types", None) or ()) | set(getattr(c, "layers_block_type", None) or ())
    if "chunked_attention" in kinds:
        return f"{name} has chunked local attention layers, which the backends do not compute"
    other = sorted(k for k in kinds if isinstance(k, str) and k not in ATTENTION_LAYER_TYPES)
    if other:
        return (f"{name} has {', '.join(other)} layers besides attention; the engine keeps only a KV cache "
                "between steps, so their state would be lost")
    if getattr(c, "attn_logit_softcapping", None) is not None:
        return f"{name} soft-caps its attention logits (attn_logit_softcapping), which the backends do not compute"
    if getattr(c, "kv_lora_rank", None):
        return f"{name} uses multi-head latent attention (kv_lora_rank), which the paged KV cache does not hold"
    if getattr(c, "lambda_std_dev", None) is not None:
        return (f"{name} uses differential attention (lambda_std_dev): two attention calls per layer over halves of "
                "the values, which the one paged KV cache of a layer does not hold")
    if getattr(c, "n_recurrent_loops", None):
        return (f"{name} runs its recurrent layers several times per token (n_recurrent_loops), each loop with a KV "
                "cache of its own, which the one paged KV cache of a layer does not hold")
    return None


def module_unsupported(model: Any) -> str | None:
    """What only the built modules show: attention sinks, bidirectional attention in the language model, and
    stateful layers the config does not name."""
    name = type(model).__name__
    for path, _ in model.named_parameters():
        if path.rsplit(".", 1)[-1] == "sinks":
            return f"{name} has attention sinks ({path}), which the backends do not compute"
    text = {id(m) for m in _text_model(model).modules()}
    for path, module in model.named_modules():
        if (id(module) in text and module.__dict__.get("is_causal") is False
                and not getattr(module, "is_cross_attention", False)):
            return (f"{name}'s attention is bidirectional ({path}.is_causal is false: an encoder, or a config without "
                    "is_decoder: true), which the engine's causal attention does not compute")
    for path, module in model.named_modules():
        if any(fragment in type(module).__name__ for fragment in _STATEFUL_MODULES):
            return (f"{name} has a {type(module).__name__} layer ({path}); the engine keeps only a KV cache "
                    "between steps, so its state would be lost")
    return None


def _text_model(model: Any) -> Any:
    """The module holding the language model's layers (not a multimodal checkpoint's encoders, which may attend
    both ways): `compile._text_model`, else the model."""
    from .compile import _text_model as text_model

    return text_model(model) or model


def _rope_parameters(c: Any) -> list[dict]:
    """The RoPE parameter sets of a config: one, or one per layer type (Gemma 3's `{"full_attention": {...}}`)."""
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return []
    if "rope_type" in rope or "type" in rope:
        return [rope]
    return [v for v in rope.values() if isinstance(v, dict)]


def context_limit(config: Any) -> tuple[int, str]:
    """The longest sequence the engine runs this model for, and what sets it (see the module's note)."""
    c = text_config(config)
    limit = getattr(c, "max_position_embeddings", None) or 1 << 20
    why = "max_position_embeddings"
    for rope in _rope_parameters(c):
        kind = str(rope.get("rope_type", rope.get("type")))
        if kind == "longrope":
            original = rope.get("original_max_position_embeddings") or getattr(
                c, "original_max_position_embeddings", None)
            if original and original < limit:
                limit, why = original, ("LongRoPE's original_max_position_embeddings: past it the rotary "
                                        "frequencies would depend on what shares the batch")
        elif "dynamic" in kind:  # transformers' own test: `"dynamic" in rope_type`
            why = (f"max_position_embeddings: dynamic NTK RoPE (factor {rope.get('factor')}) is not extended past "
                   "it, where its frequencies would depend on what shares the batch")
    return limit, why


def max_positions(config: Any) -> int:
    """The longest sequence the engine runs this model for; says so where a RoPE variant sets or caps it."""
    limit, why = context_limit(config)
    if why != "max_position_embeddings":
        log.info("sequences are limited to %d tokens (%s)", limit, why)
    return limit
