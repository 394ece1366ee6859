"""Structuring plain YAML data into frozen attrs configs (and back), with errors that name the dotted key."""

from __future__ import annotations

import sys
import types
import typing
from typing import Any, Literal

import attrs

from .errors import ConfigError
from .types import show


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads a bare off/no as false and on/yes as true: take back the word the user wrote.
            words = [w for w in (("on", "yes") if value else ("off", "no")) if w in args]
            if not words:
                raise ConfigError(key, f"{show(value)} is not allowed (YAML reads on/off/yes/no as true/false: "
                                       "quote the word)", [str(a) for a in args])
            return words[0]
        if value not in args:
            raise ConfigError(key, f"{show(value)} is not allowed", [str(a) for a in args])
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own error says more (a nested key, a number too large...)
            try:
                return _convert(options[0], value, key)
            except ConfigError as exc:
                if exc.key != key or not exc.message.startswith("expected ") or ", got " not in exc.message:
                    raise
                message = exc.message.replace(", got ", " or null, got ", 1)  # "expected an int or null, got 'x'"
                raise ConfigError(key, message, exc.valid) from None
        for arg in options:
            try:
                return _convert(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {show(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {show(value)}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {show(value)}")
        return dict(value)
    if isinstance(tp, type) and attrs.has(tp):
        if isinstance(value, tp):
            return value
        return structure(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true/false, got {type(value).__name__} {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an int, got {type(value).__name__} {show(value)}")
        limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
        if limit and value.bit_length() * 0.30103 > limit - 2:  # validators could not even print it
            raise ConfigError(key, f"expected an int, got {show(value)}: more than {limit} digits")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {type(value).__name__} {show(value)}")
        # NaN and infinities pass: the field's validator (if any) says what range it accepts
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(key, f"expected a number, got {show(value)}: too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            # `name: 2026-11-28`, `1.0` or `no` reach here as a date, a number or a bool: say how to pass text
            hint = "" if value is None or isinstance(value, (list, dict)) else (
                " (in YAML an unquoted date, number or on/off/yes/no is not text: quote it)")
            raise ConfigError(key, f"expected a string, got {type(value).__name__} {show(value)}{hint}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(key, f"expected {tp.__name__}, got {type(value).__name__} {show(value)}")
    return value


def _with_path(exc: ConfigError, key: str) -> ConfigError:
    """Validators know only their field name: prefix the path of the structure they belong to."""
    if key and not exc.key.startswith(key):
        return ConfigError(f"{key}.{exc.key.split('.')[-1]}" if exc.key else key, exc.message, exc.valid)
    return exc


def _prefixed(build: Any, key: str) -> Any:
    try:
        return build()
    except ConfigError as exc:
        raise _with_path(exc, key) from None


def structure(cls: type, data: Any, key: str) -> Any:
    """Build attrs class `cls` from a mapping, checking keys and types; errors name `key.field`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        scalar = getattr(cls, "__structure_scalar__", None)  # a class's own short form (a length: `64`)
        if scalar is not None and isinstance(data, (int, float, str)) and not isinstance(data, bool):
            return _prefixed(lambda: scalar(data), key)
        raise ConfigError(key, f"expected a mapping of {cls.__name__} fields, got {type(data).__name__} {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    hook = getattr(cls, "__structure_field__", None)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            if not fields:  # not "(valid: none)", which reads as if `none` were a key
                raise ConfigError(f"{key}.{name}" if key else name, f"unknown key: {cls.__name__} has no settings")
            raise ConfigError(f"{key}.{name}" if key else name, "unknown key", list(fields))
        sub = f"{key}.{name}" if key else name
        tp = hints.get(name, Any)  # `x = attrs.field(default=1)` has no annotation: any value, as attrs takes it
        if value is None and isinstance(tp, type) and attrs.has(tp) and fields[name].default is not attrs.NOTHING:
            continue  # `section:` with nothing under it: the field's own default, not the class's
        if hook is not None:
            handled, value = hook(name, value, sub)
            if handled:
                kwargs[name] = value
                continue
        kwargs[name] = _convert(tp, value, sub)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise _with_path(exc, key) from None
    except (TypeError, ValueError, ArithmeticError, AssertionError) as exc:  # a plugin config's own checks
        raise ConfigError(key or cls.__name__, str(exc) or f"{cls.__name__} refused these values "
                                                           f"({type(exc).__name__})") from exc


def unstructure(value: Any) -> Any:
    """The inverse of `structure`: plain dicts, lists and scalars, suitable for YAML/JSON."""
    own = getattr(value, "__unstructure__", None)  # values that know their YAML form (component specs)
    if own is not None and not isinstance(value, type):
        return own()
    if attrs.has(type(value)):
        return {f.name: unstructure(getattr(value, f.name)) for f in attrs.fields(type(value)) if f.init}
    if isinstance(value, (list, tuple)):
        return [unstructure(v) for v in value]
    if isinstance(value, dict):
        return {k: unstructure(v) for k, v in value.items()}
    return value
