"""The transformers config a run builds its model from: a preset's with `engine.model.overrides` applied, checked
(as a checkpoint's config.json is) for values transformers accepts but cannot compute.

Overrides go through the config class's own constructor, as if the preset's factory had passed them to it with
its own values, never by setting attributes on the built config: the constructor is where transformers derives
fields from others (Llama's `head_dim` from `hidden_size / num_attention_heads`, Qwen2's `layer_types` from
`use_sliding_window`), fills in and validates RoPE parameters (a `rope_scaling` without `rope_theta`, the
transformers 4 form), and checks types and shapes. Set on the built config, such an override left the derived
fields stale (a silently different model) or reached the forward half-formed (an internal TypeError).

transformers only warns about values that build a model anyway and then compute NaN, fail mid-forward or differ
from what the config says (a RoPE `factor` of 0, a sliding window of 0, KV heads that do not divide the query
heads, a RoPE type it does not know): `config_invalid` names the first such field, before any weight exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace
from typing import Any

from .errors import ConfigError
from .types import show

OVERRIDES_KEY = "engine.model.overrides"
# Fields that select or describe the model rather than shape it: an override would be silently ignored.
_NOT_OVERRIDABLE = {
    "model_type": "the architecture is the preset's: choose a preset of another architecture (asyncbatch list)",
    "architectures": "the architecture is the preset's: choose a preset of another architecture (asyncbatch list)",
    "dtype": "the weights' dtype is engine.model.dtype",
    "transformers_version": "it is written by transformers, not read",
}
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")  # the last two: the transformers 4 spelling


def _rope_flat(rope: Any) -> bool:
    return isinstance(rope, dict) and ("rope_type" in rope or "type" in rope or "rope_theta" in rope)


def _derived_fields(cls: type, data: dict[str, Any]) -> set[str]:
    """Fields the class computes from others when they are left None and the preset left to it: their built value
    equals what the class derives from the preset's other fields. They are derived again after the overrides."""
    if not dataclasses.is_dataclass(cls):
        return set()
    candidates = {f.name for f in dataclasses.fields(cls) if f.default is None and data.get(f.name) is not None}
    candidates -= {"rope_parameters", *_NOT_OVERRIDABLE}  # RoPE is merged explicitly (`_merge_rope`)
    if not candidates:
        return set()
    try:
        rebuilt = cls(**{k: v for k, v in data.items() if k not in candidates}).to_dict()
    except Exception:  # noqa: BLE001  (then nothing is treated as derived: the preset's values stay)
        return set()
    return {k for k in candidates if rebuilt.get(k) == data[k]}


def _merge_rope(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Fold `rope_parameters` / `rope_scaling` / `rope_theta` overrides into `data["rope_parameters"]`. A new RoPE
    mapping that names no `rope_theta` keeps the preset's: it changes the scaling, not the base frequency (a
    transformers 4 `rope_scaling` never holds it, and the class would fall back to 10000, not the preset's)."""
    for key in ("rope_parameters", "rope_scaling"):
        if key in overrides and not isinstance(overrides[key], (dict, type(None))):
            raise ConfigError(f"{OVERRIDES_KEY}.{key}", "expected a mapping (rope_type, rope_theta and the type's "
                                                        f"parameters) or null, got {show(overrides[key])}")
    if "rope_parameters" in overrides and "rope_scaling" in overrides:
        raise ConfigError(f"{OVERRIDES_KEY}.rope_scaling", "give rope_parameters or its old name rope_scaling, "
                                                           "not both")
    old = data.get("rope_parameters")
    given = next((k for k in ("rope_parameters", "rope_scaling") if k in overrides), None)
    rope = overrides[given] if given else old
    if given and rope is None:  # no scaling (what null meant for rope_scaling): the plain RoPE
        rope = {"rope_type": "default"}
    if isinstance(rope, dict):
        rope = dict(rope)
        if given and _rope_flat(old) and (_rope_flat(rope) or not rope):
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in old and key not in rope:
                    rope[key] = old[key]
    if "rope_theta" in overrides:
        if not _rope_flat(rope) and rope:
            raise ConfigError(f"{OVERRIDES_KEY}.rope_theta", "this preset has a RoPE mapping per layer type: set "
                                                             "rope_theta inside rope_parameters")
        rope = {**(rope or {"rope_type": "default"}), "rope_theta": overrides["rope_theta"]}
    data["rope_parameters"] = rope


def error_text(exc: BaseException) -> str:
    """One line from a transformers / huggingface_hub validation error: its detail is on the last line
    (`Validation error for field 'x':` then `TypeError: ...`); a KeyError's text is quoted."""
    lines = [line.strip() for line in str(exc).strip().strip('"').splitlines() if line.strip()]
    if len(lines) > 1 or (lines and ":" in lines[0]):
        return lines[-1]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def with_overrides(hf_config: Any, overrides: dict[str, Any]) -> Any:
    """`hf_config` rebuilt by its class with `overrides` (see the module's note); a `ConfigError` on
    `engine.model.overrides.<key>` for an unknown key, a wrong type or a value transformers refuses."""
    cls = type(hf_config)
    data = hf_config.to_dict()
    known = {k for k in data if not k.startswith("_")} | set(getattr(hf_config, "attribute_map", {}))
    if "rope_parameters" in data:
        known |= set(_ROPE_KEYS)
    for key, value in overrides.items():
        if key in _NOT_OVERRIDABLE and value != data.get(key):
            raise ConfigError(f"{OVERRIDES_KEY}.{key}", f"cannot be overridden: {_NOT_OVERRIDABLE[key]}")
        if key not in known:
            raise ConfigError(f"{OVERRIDES_KEY}.{key}", f"not a field of {cls.__name__}",
                              sorted(known - set(_NOT_OVERRIDABLE)))
    for key in _derived_fields(cls, data) - set(overrides):
        del data[key]
    data.update({k: v for k, v in overrides.items() if k not in _ROPE_KEYS})
    if any(k in overrides for k in _ROPE_KEYS):
        _merge_rope(data, overrides)
    try:
        built = cls(**data)
    except Exception as exc:  # noqa: BLE001  (transformers' own validation: types, shapes, required RoPE keys)
        bad = _rope(SimpleNamespace(**data))  # its RoPE checks can fail on a bad value (0 divides): say which
        if bad:
            key, prefix = override_key(bad[0], overrides)
            raise ConfigError(key, prefix + bad[1]) from exc
        text = error_text(exc)
        field = re.search(r"field '(\w+)'", str(exc))
        name = field.group(1) if field else ("rope_parameters" if "rope_parameters" in text else None)
        if name is None and len(overrides) == 1:  # a check across fields (hidden_size by heads): the one given
            name = next(iter(overrides))
        key, prefix = override_key(name, overrides)
        raise ConfigError(key, f"{prefix}{cls.__name__} refuses it: {text}") from exc
    for key, value in overrides.items():  # the class may overrule a field from others (Qwen2's sliding_window)
        now = getattr(built, key, value)
        if key not in _ROPE_KEYS and now != value:
            off = getattr(built, "use_sliding_window", None) is False
            hint = "; use_sliding_window: true turns the window on" if off else ""
            raise ConfigError(f"{OVERRIDES_KEY}.{key}", f"{cls.__name__} sets it to {show(now)}, not {show(value)}, "
                                                        f"from its other fields{hint}")
    return built


def override_key(field: str | None, overrides: dict[str, Any]) -> tuple[str, str]:
    """(key, prefix) naming a problem in config field `field` (dotted): the override that set it, spelled as it
    was given (`rope_scaling` or `rope_theta` for `rope_parameters`); else all the overrides, or the preset when
    there are none, with the field in the message's prefix."""
    top, _, rest = (field or "").partition(".")
    if field and top in overrides:
        return f"{OVERRIDES_KEY}.{field}", ""
    if top == "rope_parameters":
        for given in ("rope_scaling", "rope_theta"):
            if given in overrides:
                return f"{OVERRIDES_KEY}.{given}" + (f".{rest}" if rest and given == "rope_scaling" else ""), ""
    where = f"the built config's {field}: " if field else ""
    return (OVERRIDES_KEY, where) if overrides else ("engine.model.preset", where)


def refuse_invalid(hf_config: Any, overrides: dict[str, Any]) -> None:
    """`ConfigError` for the first value `config_invalid` finds, naming the override that set it."""
    bad = config_invalid(hf_config)
    if bad:
        key, prefix = override_key(bad[0], overrides)
        raise ConfigError(key, prefix + bad[1])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")  # counts a model needs >= 1 of
# RoPE fields each type reads (transformers' ROPE_INIT_FUNCTIONS), beyond rope_theta: a missing or non-numeric one
# fails mid-forward, a factor of 0 gives infinite frequencies (NaN logits).
_ROPE_NEEDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "longrope": ("original_max_position_embeddings",)}


def config_invalid(config: Any) -> tuple[str, str] | None:
    """(field, why) for the first value of a transformers config that builds a model which cannot compute what
    the config says; None when there is none. `field` is dotted (`rope_parameters.factor`)."""
    from .model_support import text_config

    c = text_config(config)
    prefix = "text_config." if c is not config else ""
    for check in (_sizes, _heads, _sliding_window, _pad, _activation, _rope):
        found = check(c)
        if found:
            return prefix + found[0], found[1]
    return None


def _sizes(c: Any) -> tuple[str, str] | None:
    for name in _SIZES:
        value = getattr(c, name, None)
        if value is None or isinstance(value, (list, tuple)):  # absent, derived, or given per layer
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return name, f"expected an int >= 1, got {show(value)}"
    return None


def _heads(c: Any) -> tuple[str, str] | None:
    heads, kv = getattr(c, "num_attention_heads", None), getattr(c, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        return "num_key_value_heads", (f"{kv} does not divide num_attention_heads={heads}: each key/value head "
                                       "serves an equal group of query heads")
    return None


def _sliding_window(c: Any) -> tuple[str, str] | None:
    window = getattr(c, "sliding_window", None)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        return "sliding_window", (f"expected null (no window) or an int >= 1 (the keys a query sees), got "
                                  f"{show(window)}")
    return None


def _pad(c: Any) -> tuple[str, str] | None:
    pad, vocab = getattr(c, "pad_token_id", None), getattr(c, "vocab_size", None)
    # negative ids count from the end, as torch's padding_idx does (configs on the Hub store -1)
    if isinstance(pad, int) and isinstance(vocab, int) and not -vocab <= pad < vocab:
        return "pad_token_id", f"{pad} is outside the vocabulary of {vocab} tokens (the embedding's padding row)"
    return None


def _activation(c: Any) -> tuple[str, str] | None:
    from transformers.activations import ACT2FN

    for name in ("hidden_act", "hidden_activation"):
        value = getattr(c, name, None)
        if isinstance(value, str) and value not in ACT2FN:
            return name, f"unknown activation {value!r} (valid: {', '.join(sorted(ACT2FN))})"
    return None


def _rope_sets(c: Any) -> list[tuple[str, Any]]:
    rope = getattr(c, "rope_parameters", None)
    if rope is None or _rope_flat(rope):
        return [("rope_parameters", rope)] if rope is not None else []
    if not isinstance(rope, dict):
        return [("rope_parameters", rope)]
    return [(f"rope_parameters.{k}", v) for k, v in rope.items() if v is not None]  # one per layer type


def _rope(c: Any) -> tuple[str, str] | None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kinds = sorted({"default", getattr(c, "default_rope_type", "default"), *ROPE_INIT_FUNCTIONS})
    for field, rope in _rope_sets(c):
        if not isinstance(rope, dict):
            return field, f"expected a mapping with rope_type and rope_theta, got {show(rope)}"
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in kinds:
            return f"{field}.rope_type", f"unknown RoPE type {show(kind)} (valid: {', '.join(kinds)})"
        theta = rope.get("rope_theta")
        if not _number(theta) or theta <= 0:
            return f"{field}.rope_theta", f"expected a number > 0 (the base frequency), got {show(theta)}"
        for key in _ROPE_NEEDS.get(kind, ()):
            if key not in rope:
                return f"{field}.{key}", f"missing: RoPE type {kind!r} needs {', '.join(_ROPE_NEEDS[kind])}"
        for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor"):
            if key in rope and not (key == "factor" and kind == "longrope" and rope[key] is None):
                if not _number(rope[key]) or rope[key] <= 0:
                    return f"{field}.{key}", f"expected a number > 0, got {show(rope[key])}"
        if kind == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
            return f"{field}.high_freq_factor", (f"must be greater than low_freq_factor ({rope['low_freq_factor']}),"
                                                 f" got {rope['high_freq_factor']}")
        original = rope.get("original_max_position_embeddings")
        if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original < 1):
            return f"{field}.original_max_position_embeddings", f"expected an int >= 1, got {show(original)}"
        if kind == "longrope":
            found = _longrope_factors(c, rope)
            if found:
                return f"{field}.{found[0]}", found[1]
    return None


def _longrope_factors(c: Any, rope: dict) -> tuple[str, str] | None:
    """LongRoPE scales each rotary frequency by its own factor: one per pair of the rotated head dimensions."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    pairs = int(head_dim * rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None) or 1.0)) // 2
    for key in ("short_factor", "long_factor"):
        value = rope.get(key)
        if not (isinstance(value, list) and len(value) == pairs and all(_number(x) and x > 0 for x in value)):
            return key, f"expected a list of {pairs} numbers > 0 (one per rotary frequency), got {show(value)}"
    return None
