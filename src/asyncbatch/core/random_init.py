"""Random weights for a preset model, built one piece at a time on the target device.

The model is first laid out on the `meta` device (no memory), then each decoder layer, and each module outside
the layers, is given memory and initialised by transformers' own `_init_weights` under a seed derived from the
preset's seed and the piece's name. Two consequences matter:

- A piece's values depend on its name and the seed only, never on what was built before it, so a
  tensor-parallel rank that shards each layer as soon as it exists (`on_layer`) holds exactly the slices of the
  whole model another process builds: TP 1 and TP N run the same weights. And a rank never holds more than its
  shard plus one whole layer, which is what lets a 70B model be built on cards that hold only a quarter of it.
- Non-persistent buffers (rotary frequencies) exist on `meta` as shapes only; `_init_weights` recomputes them.
  Every tensor is filled with NaN before its initialiser runs, and `check_initialised` refuses a model with a
  tensor left unset (an architecture whose `_init_weights` misses one) rather than run it on stale memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from .errors import UnsupportedError


def piece_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_model(hf_config: Any, *, dtype: Any, device: Any, seed: int,
                 on_layer: Callable[[int, Any], None] | None = None) -> Any:
    """A causal LM of `hf_config` with random weights on `device`. `on_layer(i, layer)` runs on each decoder
    layer right after its weights exist (tensor parallelism shards it there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .compile import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    layers = decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            _materialise(model, layer, f"layers.{i}", device, seed, recurse=True)
            if on_layer is not None:
                on_layer(i, layer)
        for name, module in model.named_modules():
            if id(module) in inside or not _owns_tensors(module):
                continue
            _materialise(model, module, name, device, seed, recurse=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    check_initialised(model)
    return model


def _owns_tensors(module: Any) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _materialise(model: Any, module: Any, name: str, device: Any, seed: int, *, recurse: bool) -> None:
    import torch

    module.to_empty(device=device, recurse=recurse)
    for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)):
        if t.is_floating_point():
            t.fill_(float("nan"))
    torch.manual_seed(piece_seed(seed, name))
    for m in (module.modules() if recurse else (module,)):
        model._init_weights(m)


def check_initialised(model: Any) -> None:
    """Refuse a model with a floating tensor still NaN: its `_init_weights` did not set it."""
    import torch

    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise UnsupportedError(f"random weights for {type(model).__name__}: {name} is not set by the model's "
                                   "own _init_weights; load the model from a checkpoint instead")
