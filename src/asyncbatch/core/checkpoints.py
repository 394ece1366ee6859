"""Reading a local transformers checkpoint for `models.build_model`: its config checked before any weight is read,
then its weights and tokenizer, every failure a one-line `ConfigError` on `engine.model.path` that says what is
missing or wrong.

transformers is imported here lazily, never at `import asyncbatch`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .types import show

log = logging.getLogger("asyncbatch")

PATH_KEY = "engine.model.path"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")


def first_line(exc: BaseException) -> str:
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
        raise ConfigError(PATH_KEY, f"no such checkpoint directory: {path}")
    if not path.is_dir():
        raise ConfigError(PATH_KEY, f"{path} is a file, not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(PATH_KEY, f"{path} has no config.json: not a transformers checkpoint directory")
    raw = _json_object(config_file)
    model_type = raw.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ConfigError(PATH_KEY, f"{config_file} has no 'model_type': cannot tell the architecture")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(PATH_KEY, f"{config_file} names an unknown architecture: model_type {model_type!r} is "
                                     "not known to this transformers version")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(PATH_KEY, f"{config_file} names architecture {model_type!r}, which transformers cannot "
                                     "load as a causal language model")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ConfigError(PATH_KEY, f"{path} has no weights: no *.safetensors or pytorch_model*.bin file (nor "
                                     "their index files)")
    _check_generation_config(path / "generation_config.json")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (transformers' validation: its detail is on the error's last line)
        raise ConfigError(PATH_KEY, f"{config_file} is unreadable: {error_text(exc)}") from exc
    bad = config_invalid(hf_config)  # values transformers only warns about, then fails on or computes NaN from
    if bad:
        raise ConfigError(PATH_KEY, f"{config_file}: {bad[0]}: {bad[1]}")
    return hf_config


def _json_object(file: Path) -> dict:
    """The JSON object in a checkpoint's `file`; anything else is a `ConfigError` on `engine.model.path`."""
    import json

    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(PATH_KEY, f"{file} is unreadable: {first_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(PATH_KEY, f"{file} is unreadable: expected a JSON object, got {type(raw).__name__}")
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
        raise ConfigError(PATH_KEY, f"{file}: eos_token_id: expected a token id or a list of token ids, got "
                                     f"{show(eos)}")


def load_weights(auto_cls: Any, path: Path, hf_config: Any, dtype: Any) -> Any:
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
        raise ConfigError(PATH_KEY, f"cannot load the weights in {path}: {first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, got, want = mismatched[0]
        raise ConfigError(PATH_KEY, f"cannot load the weights in {path}: {len(mismatched)} tensor(s) of the wrong "
                                     f"shape, e.g. {name} is {tuple(got)} in the checkpoint but {tuple(want)} in "
                                     f"the model its config.json describes")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ConfigError(PATH_KEY, f"cannot load the weights in {path}: {len(missing)} of the model's tensors are "
                                     f"missing from the weight files, e.g. {', '.join(missing[:3])}")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning("%s: %d tensor(s) of the weight files are not used by %s, e.g. %s", path, len(unexpected),
                    type(model).__name__, ", ".join(unexpected[:3]))
    return model


def load_tokenizer_or_fail(path: str, key: str) -> Any:
    try:
        return load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(key, f"cannot load the tokenizer in {path}: {first_line(exc)}") from exc


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
