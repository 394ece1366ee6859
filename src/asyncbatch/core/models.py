"""Building a `transformers` model for the engine: random weights from a preset config, or a local checkpoint.

transformers is imported here lazily, never at `import asyncbatch`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ConfigError, UnsupportedError

log = logging.getLogger("asyncbatch")

_DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("model.device is 'cuda' but this machine has no CUDA device (use 'auto' or 'cpu')")
    return torch.device(name)


def resolve_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[name])


def preset_config(cfg: ModelConfig, host: Any) -> Any:
    """The transformers config of a preset, with `overrides` applied (each key must exist)."""
    component = host.registry("model_preset").get(cfg.preset, "engine.model.preset")
    hf_config = component.factory(component.make_config({}, "engine.model.preset"))
    for key, value in cfg.overrides.items():
        if not hasattr(hf_config, key):
            raise ConfigError(f"engine.model.overrides.{key}", f"not a field of {type(hf_config).__name__}",
                              [k for k in hf_config.to_dict() if not k.startswith("_")])
        setattr(hf_config, key, value)
    return hf_config


def build_model(cfg: ModelConfig, host: Any) -> tuple[Any, Any]:
    """(model, tokenizer or None), on the configured device and dtype. The engine switches it to asyncbatch
    attention (`prepare_model`) when it wraps it."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = None
    if cfg.preset is not None:
        hf_config = preset_config(cfg, host)
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        log.info("built %s with random weights (seed %d), %.2fB parameters, %s on %s", cfg.preset, cfg.seed,
                 sum(p.numel() for p in model.parameters()) / 1e9, dtype, device)
    else:
        path = Path(cfg.path)
        if not path.is_dir():
            raise ConfigError("engine.model.path", f"no such checkpoint directory: {path}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        if cfg.tokenizer is None and (path / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(str(path))
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    return model.eval(), tokenizer


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def prepare_model(model: Any) -> Any:
    """Switch an already-loaded causal LM to the asyncbatch attention function (raises if it cannot)."""
    from .attention_api import ATTN_IMPLEMENTATION, register_with_transformers

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
    """Layers, KV heads, head size, vocabulary and context length of a transformers causal LM."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {
        "layers": c.num_hidden_layers,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "vocab": model.get_output_embeddings().weight.shape[0],
        "max_positions": getattr(c, "max_position_embeddings", 1 << 20),
    }
