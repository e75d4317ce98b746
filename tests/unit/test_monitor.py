"""The Monitor end to end in one process, with synthetic Observations (no server, no sleeps:
every check waits on ``Monitor.drain``)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from monitoring.drift.profile import build_profile, save_profile
from monitoring.monitor import Monitor
from server.core.capture import FeedbackItem, FeedbackResult, Observation
from server.core.model_config import MonitoringConfig

CFG = MonitoringConfig(components=2)


def obs(n, seed, shift=0.0, p=(0.5, 0.3, 0.2), model="m", version="1", error=None):
    rng = np.random.default_rng(seed)
    return Observation(model=model, version=version, request_ids=[f"{seed}-{i}" for i in range(n)], time=0.0,
                       features={"x": rng.normal(shift, 1, n), "y": rng.uniform(0, 1, n), "z": rng.normal(0, 1, n)},
                       predictions={"predicted_class": rng.choice(["a", "b", "c"], n, p=list(p)).astype(object),
                                    "confidence": rng.uniform(0.4, 1, n)},
                       categorical=frozenset({"predicted_class"}),
                       embedding=rng.normal(0, 1, (n, 8)).astype(np.float32), error=error)


def stream(rows, seed0, batch=50, **kw):
    return [obs(batch, seed0 + i, **kw) for i in range(rows // batch)]


class Versions:
    """The registry as the monitor sees it: resolve(model, version) -> ModelVersion-like or None."""

    def __init__(self):
        self.known: dict[tuple[str, str], SimpleNamespace] = {}

    def add(self, model, version, model_dir, config=CFG):
        self.known[(model, version)] = SimpleNamespace(archive=SimpleNamespace(model_dir=model_dir),
                                                       config=SimpleNamespace(monitoring=config))

    def __call__(self, model, version):
        return self.known.get((model, version))


@pytest.fixture
def archive(tmp_path):
    save_profile(build_profile([obs(5000, 0)], CFG, "reference.npz"), tmp_path)
    return tmp_path


@pytest.fixture
def monitor():
    made = []

    def make(resolve, **kw):
        m = Monitor(SimpleNamespace(monitoring=True, redis_url=""), resolve, **kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def feed(m, observations):
    for o in observations:
        m.observe(o)
    assert m.drain(30)


def test_in_distribution_traffic_opens_no_episode(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions)
    feed(m, stream(500 * 12, 100))
    s = m.status("m", "1")
    assert s["reference"] == "archive" and "baseline_progress" not in s and s["degraded"] is None
    assert s["requests"] == 6000 and s["windows"] == 12 and len(s["history"]) == 12
    assert s["drift"]["episodes"] == 0 and s["drift"]["episode"] is None and not s["drift"]["detected"]
    assert sum(h["drifted"] for h in s["history"]) <= 1
    assert s["drift"]["method"] == "psi" and len(s["drift"]["features"]) == 7
    json.dumps(s, allow_nan=False)  # valid JSON: no infinity in the edges


def test_an_observation_of_many_batches_closes_windows_of_the_window_size(archive, monitor):
    """Capture hands over one observation for many batches: 2,000 rows in one observation
    still close four windows of 500, not one of 2,000."""
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions)
    feed(m, [obs(2000, 7)])
    s = m.status("m", "1")
    assert s["requests"] == 2000 and s["windows"] == 4 and len(s["history"]) == 4


def test_a_shifted_feature_opens_one_episode_and_ranks_first(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive, replace(CFG, drift_share=0.2))
    m = monitor(versions)
    feed(m, stream(1000, 200))
    feed(m, stream(2000, 300, shift=1.0))
    s = m.status("m", "1")
    drift = s["drift"]
    assert drift["detected"] and drift["episodes"] == 1
    assert drift["episode"]["id"] == 1 and drift["episode"]["open"] and drift["episode"]["ended"] is None
    top = drift["features"][0]
    assert top["name"] == "x" and top["drifted"] and top["kind"] == "input" and top["threshold"] == 0.3
    assert top["reference"]["edges"][0] is None and len(top["current"]["proportions"]) == 5
    assert [h["drifted"] for h in s["history"]] == [False, False, True, True, True, True]
    text = m.render()
    assert 'osprey_drift_detected{model="m",version="1"} 1.0' in text
    assert 'osprey_drift_episodes_total{model="m",version="1"} 1.0' in text
    assert 'osprey_drift_score{model="m",version="1",feature="x"}' in text
    assert 'osprey_monitored_requests_total{model="m",version="1"} 3000.0' in text
    assert text.count("# TYPE osprey_drift_score gauge") == 1
    feed(m, stream(1500, 400))  # three clean windows close it
    drift = m.status("m", "1")["drift"]
    assert not drift["detected"] and drift["episode"]["open"] is False and drift["episodes"] == 1


def test_without_a_profile_the_first_requests_become_the_baseline(tmp_path, monitor):
    versions = Versions()
    versions.add("m", "1", tmp_path, replace(CFG, baseline_requests=1000))
    m = monitor(versions)
    feed(m, stream(400, 500))
    s = m.status("m", "1")
    assert s["reference"] == "baseline" and s["baseline_progress"] == {"rows": 400, "needed": 1000}
    assert s["windows"] == 0 and s["drift"]["features"] == []
    feed(m, stream(600 + 1000, 600))
    s = m.status("m", "1")
    assert s["baseline_progress"] == {"rows": 1000, "needed": 1000} and s["windows"] == 2
    assert s["requests"] == 2000 and not s["drift"]["detected"]
    assert {f["name"] for f in s["drift"]["features"]} >= {"x", "embedding[0]", "predicted_class"}


def test_a_bad_profile_is_named_and_the_baseline_takes_over(tmp_path, monitor):
    (tmp_path / "osprey-profile.json").write_text('{"format": "osprey-profile/1"}')
    versions = Versions()
    versions.add("m", "1", tmp_path)
    m = monitor(versions)
    s = m.status("m", "1")
    assert s["reference"] == "baseline" and "osprey-profile.json unusable" in s["degraded"]
    assert "'model' must be a string" in s["degraded"]


def test_a_failing_hook_marks_the_version_degraded(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions)
    feed(m, [obs(0, 1, error="KeyError: 'logits'")])
    s = m.status("m", "1")
    assert s["degraded"] == "monitoring hook failed on 1 batch(es): KeyError: 'logits'"
    assert 'osprey_monitoring_degraded{model="m",version="1"} 1.0' in m.render()


def test_observe_is_bounded_and_counts_drops(archive):
    versions = Versions()
    versions.add("m", "1", archive)
    m = Monitor(SimpleNamespace(monitoring=True, redis_url=""), versions, queue_size=3, start=False)
    for i in range(5):
        m.observe(obs(5, i))
    assert len(m._queue) == 3 and m.dropped == 2
    assert "osprey_monitoring_dropped_total 2.0" in m.render()
    m.close()


def test_unknown_versions_and_monitoring_off(archive, monitor):
    versions = Versions()
    versions.add("off", "1", archive, replace(CFG, enabled=False))
    m = monitor(versions)
    feed(m, [obs(50, 1, model="ghost"), obs(50, 2, model="off")])
    with pytest.raises(KeyError, match="no version '1' of model 'ghost'"):
        m.status("ghost", "1")
    assert m.status("off", "1")["degraded"] == "monitoring is off"
    off = Monitor(SimpleNamespace(monitoring=False, redis_url=""), versions, start=False)
    off.observe(obs(5, 1))
    assert not off._queue
    off.close()


def test_forget_drops_the_version(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions)
    feed(m, stream(500, 1))
    assert m.status("m", "1")["windows"] == 1
    m.forget("m", "1")
    assert 'version="1"' not in m.render()
    assert m.status("m", "1")["windows"] == 0


class FakeQuality:
    def __init__(self, model, version, config, model_dir, store):
        self.args = (model, version, config, model_dir, store)
        self.rows = 0

    def record(self, o):
        self.rows += len(o)

    def feedback(self, items):
        return FeedbackResult(accepted=len(items))

    def status(self):
        return {"labels": self.rows, "unmatched": 0, "invalid": 0, "metrics": {"accuracy": 0.9}, "baseline": {},
                "degraded": False, "estimated": None}

    def render_lines(self):
        m, v = self.args[:2]
        return [f'osprey_quality{{model="{m}",version="{v}",metric="accuracy"}} 0.9',
                f'osprey_feedback_total{{model="{m}",version="{v}",result="matched"}} 3']


def test_quality_is_delegated_to_the_part_the_factory_makes(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions, quality_factory=FakeQuality)
    feed(m, stream(500, 1))
    s = m.status("m", "1")
    assert s["quality"]["labels"] == 500 and s["history"][0]["quality"] == {"accuracy": 0.9}
    result = asyncio.run(m.feedback("m", "1", [FeedbackItem("1-0", "a", 0)]))
    assert result.accepted == 1
    text = m.render()
    assert "# TYPE osprey_quality gauge" in text and "# TYPE osprey_feedback_total counter" in text
    assert 'osprey_feedback_total{model="m",version="1",result="matched"} 3\n' in text
    part = m._versions[("m", "1")].quality
    assert part.args[2] is versions("m", "1").config.monitoring and part.args[3] == archive
    assert part.args[4] is m.store


def test_the_background_thread_ticks_the_quality_parts(archive, monitor):
    # the quality part flushes predictions it buffered while Redis was down on tick(): that must
    # happen without a new request or a status call on this replica
    ticks = []

    class Ticking(FakeQuality):
        def tick(self):
            ticks.append(self.args[:2])

    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions, quality_factory=Ticking, refresh=0.05)
    feed(m, stream(50, 1))
    deadline = time.monotonic() + 10
    while len(ticks) < 3:
        assert time.monotonic() < deadline, ticks
        time.sleep(0.01)
    assert set(ticks) == {("m", "1")}


def test_feedback_without_a_quality_part_is_unmatched(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions)
    result = asyncio.run(m.feedback("m", "1", [FeedbackItem("x", 1, 0)]))
    assert result.as_dict() == {"accepted": 0, "unmatched": 1, "invalid": 0, "unmatched_ids": ["x"]}


def test_a_window_also_closes_after_window_seconds_with_min_window_rows(archive, monitor):
    now = [1000.0]
    versions = Versions()
    versions.add("m", "1", archive, replace(CFG, window_seconds=60.0, min_window=100))
    m = monitor(versions, clock=lambda: now[0])
    feed(m, stream(50, 1))
    now[0] += 61
    feed(m, [])
    assert m.status("m", "1")["windows"] == 0  # 50 rows < min_window: the window goes on
    feed(m, stream(100, 2))
    s = m.status("m", "1")
    assert s["windows"] == 1 and s["history"][0]["ended"] == 1061.0
    assert not s["history"][0]["drifted"] and not s["drift"]["detected"]


def test_a_window_whose_commit_failed_is_committed_once_the_store_answers(archive, monitor):
    from monitoring.store import LocalStore, StoreUnavailable

    class Flaky(LocalStore):
        fail = True

        def commit(self, model, version, update):
            if self.fail:
                raise StoreUnavailable("Redis unavailable: test")
            return super().commit(model, version, update)

    store = Flaky()
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions, store=store)
    feed(m, stream(500, 1))
    s = m.status("m", "1")
    assert s["windows"] == 0 and s["degraded"] == "Redis unavailable: test"
    store.fail = False
    feed(m, [])
    s = m.status("m", "1")
    assert s["windows"] == 1 and s["degraded"] is None and s["requests"] == 500


def test_an_embedding_of_the_wrong_width_is_named_and_clears_when_it_fits_again(archive, monitor):
    versions = Versions()
    versions.add("m", "1", archive)
    m = monitor(versions)
    bad = obs(50, 1)
    bad.embedding = np.zeros((50, 3), dtype=np.float32)
    feed(m, [bad])
    assert m.status("m", "1")["degraded"] == ("features do not match the profile: "
                                              "embedding has 3 columns, the profile's projection 8")
    feed(m, [obs(50, 2)])
    assert m.status("m", "1")["degraded"] is None


def test_feedback_kept_as_a_training_row_says_so_even_without_quality(archive, monitor, tmp_path):
    """An embedding model keeps no predictions for live quality, but with retraining on a label
    joins its request's held inputs as a training row: the answer counts it as ``kept``."""
    from monitoring.dataset import LabelledData
    from tests.unit.test_dataset import body, version

    mv = version()  # model m 1.0 with a retraining section
    data = LabelledData(tmp_path)
    data.hold(mv, body("held"))
    versions = Versions()
    versions.add("m", "1.0", archive)
    versions.known[("m", "1.0")].config.retraining = mv.config.retraining
    m = monitor(versions, dataset=data)
    items = [FeedbackItem("held", "sports", 0), FeedbackItem("never-answered", "food", 1)]
    result = asyncio.run(m.feedback("m", "1.0", items))
    assert result.as_dict() == {"accepted": 0, "unmatched": 2, "invalid": 0, "kept": 1,
                                "unmatched_ids": ["held", "never-answered"]}


def test_a_label_the_model_cannot_take_is_not_kept_as_a_training_row(archive, monitor, tmp_path):
    """A label refused as invalid (a class the model does not have) must not become a training
    row: once stored, every retraining that read it failed on it. Refused whether its
    prediction is kept (the quality join finds it invalid) or not (judged by the model's outputs)."""
    from monitoring.dataset import LabelledData, read_rows
    from monitoring.quality import quality_factory
    from tests.unit.test_dataset import body, version

    mv = version()
    data = LabelledData(tmp_path)
    for rid in ("good", "cat", "unseen-cat", "unseen-good", "two-records", "one-record"):
        data.hold(mv, body(rid))
    versions = Versions()
    versions.add("m", "1.0", archive)
    versions.known[("m", "1.0")].config.retraining = mv.config.retraining
    m = monitor(versions, dataset=data,
                quality_factory=lambda model, version, cfg, model_dir, store: quality_factory(model, version, cfg,
                                                                                              model_dir, None))
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],
                     dtype=np.float32)
    feed(m, [replace(obs(5, 1, model="m", version="1.0"), request_ids=["good", "cat", "two-records", "two-records",
                                                                       "one-record"],
                     request_rows=np.array([0, 1, 2, 2, 3]), outputs=probs, task="classification",
                     classes=("a", "b", "c"))])
    items = [FeedbackItem("good", "a", 0), FeedbackItem("cat", "cat", 1), FeedbackItem("unseen-cat", "cat", 2),
             FeedbackItem("unseen-good", "b", 3), FeedbackItem("two-records", ["c", "a"], 4),
             FeedbackItem("one-record", ["b", "b"], 5)]
    result = asyncio.run(m.feedback("m", "1.0", items))
    # a request of two records labelled with a list: one label per record, for live quality
    # and as a training row; a list of two for a request of one record is refused by both
    assert (result.accepted, result.invalid, result.unmatched, result.kept) == (2, 2, 2, 3)
    assert result.rejected == {1, 5}
    assert any(e.startswith("feedback[1]") and "'cat' is not a class" in e for e in result.errors), result.errors
    assert any(e.startswith("feedback[2] (request_id 'unseen-cat')") and "not kept for retraining" in e
               for e in result.errors), result.errors
    rows = read_rows("m", root=tmp_path)
    assert sorted((r["rid"], r["label"]) for r in rows) == [("good", "a"), ("two-records", ["c", "a"]),
                                                             ("unseen-good", "b")]
    # the corrected label for the refused one is then joined and kept
    again = asyncio.run(m.feedback("m", "1.0", [FeedbackItem("one-record", "b", 0)]))
    assert (again.accepted, again.kept) == (1, 1)
    assert ("one-record", "b") in [(r["rid"], r["label"]) for r in read_rows("m", root=tmp_path)]


def test_a_label_waits_for_its_prediction_handed_over_later_than_the_capture_delay(archive, monitor):
    """A label sent right after its answer, whose prediction reaches the monitor only after the
    fixed capture delay (an instance busy with more traffic, a monitor short of CPU), still joins
    while predictions keep arriving; an id that is not on its way stops the wait and is unmatched.
    The late prediction is handed over from inside the monitor's first look-up that misses it, so
    nothing here depends on timing."""
    from monitoring.quality import quality_factory
    from tests.unit.test_quality import obs as qobs, probs

    versions = Versions()
    versions.add("m", "1", archive, replace(CFG, min_labels=1))
    m = monitor(versions, quality_factory=lambda model, version, cfg, model_dir, store: quality_factory(
        model, version, cfg, model_dir, None))
    m.capture_delay = 0.05
    feed(m, [qobs(["early"], probs(1))])
    quality = m._ensure("m", "1").quality
    looked, holds = [], quality.holds

    def late_holds(rids):
        got = holds(rids)
        looked.append(dict(zip(rids, got)))
        if len(looked) == 1:  # the first look misses "late": its prediction arrives only now
            m.observe(qobs(["late"], probs(1, seed=1)))
        return got
    quality.holds = late_holds
    m.answered(None, None, None)  # an answer left just now: predictions are flowing
    result = asyncio.run(m.feedback("m", "1", [FeedbackItem("early", "cat", 0), FeedbackItem("late", "dog", 1),
                                               FeedbackItem("never-answered", "bird", 2)]))
    assert looked[0] == {"early": True, "late": False, "never-answered": False}
    assert any(seen.get("late") for seen in looked[1:])
    assert result.as_dict() == {"accepted": 2, "unmatched": 1, "invalid": 0, "unmatched_ids": ["never-answered"]}


def test_after_the_data_planes_barrier_a_label_joins_what_was_queued_and_no_id_is_waited_for(archive, monitor):
    """``flushed``: the model's instances handed their capture over before the call (the data
    plane's barrier), and this monitor's store is its own (no replicas): a label joins the
    prediction queued just before it, and one for an id nobody answered is unmatched without
    the look-ups that wait for predictions on their way, though an answer left just now."""
    from monitoring.quality import quality_factory
    from tests.unit.test_quality import obs as qobs, probs

    versions = Versions()
    versions.add("m", "1", archive, replace(CFG, min_labels=1))
    m = monitor(versions, quality_factory=lambda model, version, cfg, model_dir, store: quality_factory(
        model, version, cfg, model_dir, None))
    feed(m, [qobs(["early"], probs(1))])
    quality = m._ensure("m", "1").quality
    looked, holds = [], quality.holds
    quality.holds = lambda rids: looked.append(list(rids)) or holds(rids)
    m.observe(qobs(["just-now"], probs(1, seed=1)))  # handed over by the barrier, not yet recorded
    m.answered(None, None, None)  # an answer left just now: predictions are flowing
    result = asyncio.run(m.feedback("m", "1", [FeedbackItem("early", "cat", 0), FeedbackItem("just-now", "dog", 1),
                                               FeedbackItem("never-answered", "bird", 2)], flushed=True))
    assert result.as_dict() == {"accepted": 2, "unmatched": 1, "invalid": 0, "unmatched_ids": ["never-answered"]}
    assert looked == []  # no wait for "never-answered" to arrive


def test_the_monitor_process_joins_after_the_marks_its_barrier_posted_on_the_childrens_links(tmp_path):
    """A process instance's child posts a mark behind its observations on its own link; the
    monitor process reads links and the server's calls on different threads, so a feedback
    call names the marks and waits until they were read (then they are forgotten), at most
    MARK_WAIT_S; a mark that never comes makes the join wait as it would without a barrier."""
    import threading
    from types import SimpleNamespace

    from monitoring.process import _Host

    host = _Host(SimpleNamespace(monitoring=True, redis_url="", model_store=str(tmp_path), state_dir=""))
    try:
        assert host._wait_marks(["a"], 0.01) is False
        waited = []
        waiter = threading.Thread(target=lambda: waited.append(host._wait_marks(["a", "b"], 60)))
        waiter.start()
        host.data(("mark", "a"))
        host.data(("mark", "b"))  # (read on a link's thread: wakes the call)
        waiter.join(60)
        assert waited == [True] and not waiter.is_alive()
        assert host._wait_marks(["a"], 0.01) is False  # consumed by the call that waited for it
        for i in range(5000):  # marks no call waits for (a barrier that gave up) stay bounded
            host.data(("mark", f"left-{i}"))
        assert len(host._marks) <= 4096
    finally:
        host.monitor.close()
