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
