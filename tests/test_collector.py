"""The collector pause of runs on a real device: collection off and the heap frozen for the run, both restored
after; a pause that is not active changes nothing."""

from __future__ import annotations

import gc

import pytest

from asyncbatch.core.collector import CollectorPause


@pytest.fixture
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


@pytest.mark.parametrize("enabled_before", [True, False])
def test_a_run_pauses_the_collector_and_leaves_it_as_it_found_it(collector_restored, enabled_before):
    (gc.enable if enabled_before else gc.disable)()
    pause = CollectorPause(active=True)
    pause.pause()
    assert (False, True) == (gc.isenabled(), gc.get_freeze_count() > 0)
    pause.resume()
    assert (enabled_before, 0) == (gc.isenabled(), gc.get_freeze_count())


def test_an_inactive_pause_changes_nothing(collector_restored):
    gc.enable()
    pause = CollectorPause(active=False)
    pause.pause()
    assert (True, 0) == (gc.isenabled(), gc.get_freeze_count())
    pause.resume()
    assert gc.isenabled()
