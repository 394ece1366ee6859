"""Placeholder being replaced by the Triton paged-attention backend (work in progress in this session)."""

from __future__ import annotations

from typing import Any

import attrs

from ...core.errors import UnsupportedError
from ...core.interfaces import AttentionBackend


@attrs.frozen
class TritonPagedConfig:
    """No parameters yet."""


class TritonPaged(AttentionBackend):
    """Triton paged attention (not built yet)."""

    Config = TritonPagedConfig
    auto_priority = 50

    def __init__(self, config: TritonPagedConfig | None = None) -> None:
        self.config = config or TritonPagedConfig()

    def check(self, device: Any, dtype: Any, head_dim: int, block_size: int) -> None:
        raise UnsupportedError("the triton backend is not built yet")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedError("the triton backend is not built yet")
