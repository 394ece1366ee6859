"""Building a `transformers` model for the engine: random weights from a preset config, or a local checkpoint.

transformers is imported here lazily, never at `import asyncbatch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        hf_config = checkpoint_config(path)
        reason = config_unsupported(hf_config)
        if reason:  # before any weight is read
            raise UnsupportedError(f"{path}: {reason}")
        model = _load_weights(AutoModelForCausalLM, path, hf_config, dtype)
        if on_layer is not None:
            from .compile import decoder_layers

            for i, layer in enumerate(decoder_layers(model)):
                on_layer(i, layer)
        model = model.to(device)
        log.info("loaded %s (%s) from %s, %s parameters, %s on %s", type(model).__name__, hf_config.model_type,
                 path, count_text(sum(p.numel() for p in model.parameters())), dtype, device)
        if cfg.tokenizer is None and (path / "tokenizer_config.json").is_file():
            tokenizer = _load_tokenizer_or_fail(str(path), _PATH_KEY)
    if cfg.tokenizer is not None:
        tokenizer = _load_tokenizer_or_fail(cfg.tokenizer, "engine.model.tokenizer")
    return model.eval(), tokenizer


_PATH_KEY = "engine.model.path"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def checkpoint_config(path: Path) -> Any:
    """The transformers config of the checkpoint directory `path`, after checking (without reading weights) that
    it holds a config of a known causal-LM architecture and weight files; `ConfigError` naming what is missing."""

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .model_config import config_invalid, error_text

    if not path.exists():
        raise ConfigError(_PATH_KEY, f"no such checkpoint directory: {path}")
    if not path.is_dir():
        raise ConfigError(_PATH_KEY, f"{path} is a file, not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(_PATH_KEY, f"{path} has no config.json: not a transformers checkpoint directory")
    raw = _json_object(config_file)
    model_type = raw.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ConfigError(_PATH_KEY, f"{config_file} has no 'model_type': cannot tell the architecture")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(_PATH_KEY, f"{config_file} names an unknown architecture: model_type {model_type!r} is "
                                     "not known to this transformers version")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(_PATH_KEY, f"{config_file} names architecture {model_type!r}, which transformers cannot "
                                     "load as a causal language model")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ConfigError(_PATH_KEY, f"{path} has no weights: no *.safetensors or pytorch_model*.bin file (nor "
                                     "their index files)")
    _check_generation_config(path / "generation_config.json")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (transformers' validation: its detail is on the error's last line)
        raise ConfigError(_PATH_KEY, f"{config_file} is unreadable: {error_text(exc)}") from exc
    bad = config_invalid(hf_config)  # values transformers only warns about, then fails on or computes NaN from
    if bad:
        raise ConfigError(_PATH_KEY, f"{config_file}: {bad[0]}: {bad[1]}")
    return hf_config


def _json_object(file: Path) -> dict:
    """The JSON object in a checkpoint's `file`; anything else is a `ConfigError` on `engine.model.path`."""
    import json

    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(_PATH_KEY, f"{file} is unreadable: {_first_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(_PATH_KEY, f"{file} is unreadable: expected a JSON object, got {type(raw).__name__}")
    return raw


def _check_generation_config(file: Path) -> None:
    """transformers falls back to defaults, without a word, when generation_config.json cannot be read, and keeps
    an `eos_token_id` that is no token id: the run would then stop at other EOS tokens, or at none."""
    if not file.is_file():
        return
    raw = _json_object(file)
    eos = raw.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not all(type(t) is int for t in ids):
        raise ConfigError(_PATH_KEY, f"{file}: eos_token_id: expected a token id or a list of token ids, got "
                                     f"{show(eos)}")


def _load_weights(auto_cls: Any, path: Path, hf_config: Any, dtype: Any) -> Any:
    """`from_pretrained`, with every failure (unreadable files, missing or mis-shaped tensors) a one-line
    `ConfigError`. transformers' multi-line load report is silenced: its findings are raised or logged here; its
    progress bar shows on a terminal only."""
    import sys

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if bar and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        model, info = auto_cls.from_pretrained(path, config=hf_config, dtype=dtype, local_files_only=True,
                                               output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # noqa: BLE001  (any failure to read the weights is a bad checkpoint)
        raise ConfigError(_PATH_KEY, f"cannot load the weights in {path}: {_first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, got, want = mismatched[0]
        raise ConfigError(_PATH_KEY, f"cannot load the weights in {path}: {len(mismatched)} tensor(s) of the wrong "
                                     f"shape, e.g. {name} is {tuple(got)} in the checkpoint but {tuple(want)} in "
                                     f"the model its config.json describes")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConfigError(_PATH_KEY, f"cannot load the weights in {path}: {len(missing)} of the model's tensors are "
                                     f"missing from the weight files, e.g. {', '.join(missing[:3])}")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s: %d tensor(s) of the weight files are not used by %s, e.g. %s", path, len(unexpected),
                    type(model).__name__, ", ".join(unexpected[:3]))
    return model


def _load_tokenizer_or_fail(path: str, key: str) -> Any:
    try:
        return load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(key, f"cannot load the tokenizer in {path}: {_first_line(exc)}") from exc


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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
        "kv_heads": (getattr(c, "num_key_value_heads", None) or heads) // shards,
        "head_dim": head_dim,
        "vocab": _vocab(model.get_output_embeddings()),
        "max_positions": max_positions(model.config),
    }


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
