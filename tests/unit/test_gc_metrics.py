"""osprey_gc_pause_seconds times each collection by its generation (monitoring.gc_metrics)."""

import gc

from prometheus_client.parser import text_string_to_metric_families

from monitoring.gc_metrics import gc_collector


def _families() -> dict:
    return {f.name: f for f in text_string_to_metric_families(gc_collector().render())}


def _counts() -> dict[str, float]:
    return {s.labels["generation"]: s.value for s in _families()["osprey_gc_pause_seconds"].samples
            if s.name == "osprey_gc_pause_seconds_count"}


def test_each_collection_is_timed_under_its_generation():
    enabled = gc.isenabled()
    gc.disable()  # only the three collections below (rendering allocates, and could start one)
    try:
        before = _counts()
        gc.collect(0)
        gc.collect(1)
        gc.collect(2)
        after = _counts()
    finally:
        if enabled:
            gc.enable()
    assert {g: after[g] - before.get(g, 0) for g in ("0", "1", "2")} == {"0": 1, "1": 1, "2": 1}


def test_the_frozen_heap_is_reported():
    kept = [[] for _ in range(100)]  # noqa: F841 (alive at the freeze)
    gc.freeze()
    try:
        # (frozen objects that die meanwhile leave the count, so it is read on either side)
        before = gc.get_freeze_count()
        reported = _families()["osprey_gc_frozen_objects"].samples[0].value
        after = gc.get_freeze_count()
        assert before >= reported >= after > 0
    finally:
        gc.unfreeze()
