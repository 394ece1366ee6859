"""Built-in buffer policies: how many slots, so how many batches the host may prepare ahead."""

from __future__ import annotations

import attrs

from ..core.errors import ConfigError
from ..core.interfaces import BufferPolicy


@attrs.frozen
class SingleConfig:
    """One slot: the host waits for each batch before preparing the next (the synchronous baseline)."""


class Single(BufferPolicy):
    """One slot: the synchronous loop."""

    Config = SingleConfig

    def __init__(self, config: SingleConfig | None = None) -> None:
        self.config = config or SingleConfig()

    @property
    def num_slots(self) -> int:
        return 1


@attrs.frozen
class DoubleConfig:
    """Two slots: the host prepares batch k+1 while the device computes batch k."""


class Double(BufferPolicy):
    """Two slots (double buffering): one batch in flight while the next is prepared."""

    Config = DoubleConfig

    def __init__(self, config: DoubleConfig | None = None) -> None:
        self.config = config or DoubleConfig()

    @property
    def num_slots(self) -> int:
        return 2


def _at_least_two(_: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 2:
        raise ConfigError(f"buffers.{attribute.name}",
                          f"n_slot needs at least 2 slots, got {value} (use 'single' for one slot)")


@attrs.frozen
class NSlotConfig:
    """`num_slots` >= 2: the host runs up to `num_slots - 1` batches ahead of the device."""

    num_slots: int = attrs.field(default=3, validator=_at_least_two)


class NSlot(BufferPolicy):
    """N slots: up to N-1 batches in flight while the next is prepared."""

    Config = NSlotConfig

    def __init__(self, config: NSlotConfig | None = None) -> None:
        self.config = config or NSlotConfig()

    @property
    def num_slots(self) -> int:
        return self.config.num_slots
