"""The server's heap settings once models are loaded (server.core.heap.freeze)."""

import gc

import pytest

from server.core import heap


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)
    gc.unfreeze()


def test_young_collections_become_rarer_and_loaded_objects_are_frozen(thresholds):
    gc.set_threshold(700, 10, 10)
    kept = [object() for _ in range(10)]  # noqa: F841 (alive at the freeze)
    heap.freeze()
    assert gc.get_threshold() == (heap.GEN0_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() > 0


def test_a_users_own_setting_is_kept(thresholds):
    gc.set_threshold(50_000, 5, 5)  # higher than Osprey's: theirs
    heap.freeze()
    assert gc.get_threshold() == (50_000, 5, 5)
    gc.set_threshold(0)  # the collector turned off on purpose stays off
    heap.freeze()
    assert gc.get_threshold()[0] == 0


@pytest.fixture
def collector():
    enabled = gc.isenabled()
    yield
    heap._held = False
    (gc.enable if enabled else gc.disable)()
    gc.unfreeze()


def test_the_collector_waits_for_the_startup_models_then_runs_again(collector, thresholds):
    gc.enable()
    heap.hold()  # the server's start
    assert not gc.isenabled()
    heap.freeze()  # the startup models are loaded
    assert gc.isenabled()
    gc.disable()  # a later freeze (a model loaded at run time) does not turn it on again
    heap.freeze()
    assert not gc.isenabled()


def test_a_collector_turned_off_before_the_start_stays_off(collector, thresholds):
    gc.disable()
    heap.hold()
    heap.freeze()
    assert not gc.isenabled()
