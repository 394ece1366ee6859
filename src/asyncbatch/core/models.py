"""Building a `transformers` model for the engine: random weights from a preset config, or a local checkpoint.

transformers is imported here lazily, never at `import asyncbatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import checkpoints
from .checkpoints import checkpoint_config, load_tokenizer  # noqa: F401  (their home before; importers use them here)
from .config import ModelConfig
from .errors import ConfigError, UnsupportedError
from .types import show

log = logging.getLogger("asyncbatch")

_DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("engine.model.device: 'cuda', but this machine has no CUDA device (use auto or cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[name])


def preset_config(cfg: ModelConfig, host: Any) -> Any:
    """The transformers config of a preset, with `overrides` applied (each key must be a field of it) and checked
    for values transformers accepts but cannot compute (`model_config`); `ConfigError` naming the key."""
    from .model_config import OVERRIDES_KEY, refuse_invalid, with_overrides

    component = host.registry("model_preset").get(cfg.source_preset, "engine.model.preset")
    hf_config = component.factory(component.make_config({}, "engine.model.preset"))
    for key, value in cfg.overrides.items():
        if key in _SIZES and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{OVERRIDES_KEY}.{key}", f"expected an int >= 1, got {show(value)}")
    if cfg.overrides:
        hf_config = with_overrides(hf_config, cfg.overrides)
    refuse_invalid(hf_config, cfg.overrides)
    return hf_config


def check_model_config(cfg: ModelConfig, host: Any) -> Any:
    """What `build_model` would refuse before reading a weight: the preset with its overrides, or the checkpoint's
    config.json and architecture. Cheap (no weights, no tokenizer), so a run checks every sweep cell up front.
    Returns the transformers config it checked."""
    if cfg.source_preset is not None:
        return preset_config(cfg, host)
    from .model_support import config_unsupported

    path = Path(cfg.path).expanduser()
    config = checkpoint_config(path)
    reason = config_unsupported(config)
    if reason:
        raise UnsupportedError(f"{path}: {reason}")
    return config


_SIZES = frozenset({"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"})  # counts a model needs >= 1 of


def build_model(cfg: ModelConfig, host: Any, *, on_layer: Callable[[int, Any], None] | None = None
                ) -> tuple[Any, Any]:
    """(model, tokenizer or None), on the configured device and dtype. The engine switches it to asyncbatch
    attention (`prepare_model`) when it wraps it.

    A preset's random weights are built a decoder layer at a time (`random_init`); `on_layer(i, layer)` runs on
    each layer as soon as it exists (a tensor-parallel rank shards it there). A checkpoint is loaded whole, and
    `on_layer` runs on its layers after loading.

    A `path` that is not a loadable checkpoint fails with a one-line `ConfigError` on `engine.model.path` that
    says what is missing; the cheap checks (directory, config.json, architecture, weight files) run before any
    weights are read."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = None
    preset = cfg.source_preset
    if preset is not None:
        from .random_init import random_model

        hf_config = preset_config(cfg, host)
        model = random_model(hf_config, dtype=dtype, device=device, seed=cfg.seed, on_layer=on_layer)
        log.info("built %s with random weights (seed %d), %s parameters, %s on %s", preset, cfg.seed,
                 count_text(sum(p.numel() for p in model.parameters())), dtype, device)
    else:
        from .model_support import config_unsupported

        path = Path(cfg.path).expanduser()
        hf_config = checkpoints.checkpoint_config(path)
        reason = config_unsupported(hf_config)
        if reason:  # before any weight is read
            raise UnsupportedError(f"{path}: {reason}")
        model = checkpoints.load_weights(AutoModelForCausalLM, path, hf_config, dtype)
        if on_layer is not None:
            from .compile import decoder_layers

            for i, layer in enumerate(decoder_layers(model)):
                on_layer(i, layer)
        model = model.to(device)
        log.info("loaded %s (%s) from %s, %s parameters, %s on %s", type(model).__name__, hf_config.model_type,
                 path, count_text(sum(p.numel() for p in model.parameters())), dtype, device)
        if cfg.tokenizer is None and (path / "tokenizer_config.json").is_file():
            tokenizer = checkpoints.load_tokenizer_or_fail(str(path), checkpoints.PATH_KEY)
    if cfg.tokenizer is not None:
        tokenizer = checkpoints.load_tokenizer_or_fail(cfg.tokenizer, "engine.model.tokenizer")
    return model.eval(), tokenizer


def prepare_model(model: Any) -> Any:
    """Switch an already-loaded causal LM to the asyncbatch attention function (raises if it cannot)."""
    from .attention_api import ATTN_IMPLEMENTATION, register_with_transformers
    from .model_support import config_unsupported, module_unsupported

    reason = config_unsupported(model.config) or module_unsupported(model)
    if reason:
        raise UnsupportedError(reason)
    register_with_transformers()
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        raise UnsupportedError(f"{type(model).__name__} does not route attention through the transformers "
                               "attention-function registry, so asyncbatch cannot page its KV cache")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.eval()
    model.requires_grad_(False)
    return model


def model_geometry(model: Any) -> dict[str, int]:
    """Layers, KV heads (this rank's, in a tensor-parallel model), head size, vocabulary and context length of a
    transformers causal LM."""
    from .model_support import max_positions

    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    shards = getattr(model, "_asyncbatch_tensor_parallel", 1)  # set by asyncbatch.parallel.tensor.shard
    return {
        "layers": c.num_hidden_layers,
        "kv_heads": _attention_kv_heads(c, heads) // shards,
        "head_dim": head_dim,
        "vocab": _vocab(model.get_output_embeddings()),
        "max_positions": max_positions(model.config),
    }


def _attention_kv_heads(c: Any, heads: int) -> int:
    """The KV heads a layer hands the attention function, which the cache holds: `num_key_value_heads`, except in
    JetMoE, whose layers tile their keys and values `num_experts_per_tok` times to all `num_attention_heads` first."""
    if getattr(c, "model_type", None) == "jetmoe":
        return heads
    return getattr(c, "num_key_value_heads", None) or heads


def _vocab(head: Any) -> int:
    # a vocabulary-parallel head (asyncbatch.parallel.vocab) holds a slice of the rows and says the whole count
    return getattr(head, "full_vocab", None) or head.weight.shape[0]


def eos_token_ids(model: Any, vocab: int) -> tuple[int, ...]:
    """The end-of-sequence tokens `generate()` would stop at: the model's generation config, else its config.
    Ids outside the vocabulary are dropped (they can never be sampled)."""
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, "eos_token_id", None) if gen is not None else None
    if value is None:
        c = model.config
        value = getattr(getattr(c, "text_config", None) or c, "eos_token_id", None)
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) else list(value)
    return tuple(sorted({int(t) for t in ids if isinstance(t, int) and 0 <= t < vocab}))


def count_text(n: int) -> str:
    """A parameter count people can read at every scale: 1.23M, 8.03B, 640."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
