"""Tiny models for tests: random weights from a preset, on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.plugin_host import PluginHost


def tiny_model(preset: str = "tiny", dtype: str = "float64", *, host: PluginHost | None = None) -> Any:
    """A model built from `preset` (random weights, on the CPU), uncached: the pytest fixtures cache per session.

    float64 is the default because checks compare tokens across different batch shapes: in float32 a different
    shape can round differently and flip an argmax."""
    from ..core.config import ModelConfig
    from ..core.models import build_model
    from .combos import builtin_host

    model, _ = build_model(ModelConfig(preset=preset, dtype=dtype, device="cpu"), host or builtin_host())
    return model
