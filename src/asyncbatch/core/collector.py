"""Keeping Python's garbage collector out of a run on a real device.

A full collection in the middle of a run stalls the host for tens of milliseconds, longer than the slack the slots
give it (measured: a 16 ms `prep` at batch 32 against 4.5 ms of slack). So for the length of a run, long-lived
objects are frozen out of the collector's way and collection is off; both come back when the run ends.
"""

from __future__ import annotations

import gc


class CollectorPause:
    """`pause()` at the start of a run, `resume()` at its end (in a `finally`), by the thread that holds the
    engine. Does nothing where `active` is false (simulated and CPU runtimes, which have no slack to protect)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self._was_enabled = True

    def pause(self) -> None:
        if self.active:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.freeze()
            gc.disable()

    def resume(self) -> None:
        if self.active:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
