"""Execution choosers for the `sim` runtime: hypothesis-driven (`DataChooser`), or seeded (`RandomChooser`).

`Chooser` is the runtime's protocol (``choose(n) -> int`` in ``range(n)``), re-exported from
`asyncbatch.core.runtime.sim`.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import strategies as st

from ..core.runtime.sim import Chooser, RandomChooser

__all__ = ["Chooser", "DataChooser", "RandomChooser"]


class DataChooser:
    """Lets hypothesis pick every scheduling decision of the `sim` runtime (which ready op runs next, how far the
    device runs ahead of the host), so that a failing execution order is replayed and shrunk like any input.

    `data` is the value of ``st.data()``; the chooser draws from it once, at construction (hypothesis's report
    then shows one draw, not one per decision), and every `choose(n)` takes one integer in ``[0, n)`` from that
    draw, shrinking towards 0. Nothing is drawn for ``n <= 1``. After `max_draws` decisions it goes on with a
    random order seeded from the data: a long run then neither overruns hypothesis's budget of choices per
    example (which discards the example silently) nor stops being reproducible.
    """

    def __init__(self, data: Any, *, max_draws: int = 3000) -> None:
        self.data = data
        self.max_draws = max_draws
        self.draws = 0
        self._rng: random.Random = data.draw(st.randoms(use_true_random=False), label="execution order")

    def choose(self, n: int) -> int:
        if n <= 1:
            return 0
        self.draws += 1
        if self.draws == self.max_draws + 1:
            self._rng = random.Random(self._rng.getrandbits(64))
        return self._rng.randrange(n)
