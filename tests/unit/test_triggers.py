"""Retraining triggers: one job per model and episode, cooldown, alerts, kept triggers.

The job queue is the real embedded one (records in files; not started, so nothing runs);
the registry and the monitor are in-process stand-ins that answer what the server's would."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from server.core.errors import ErrorKind, OspreyError
from server.core.model_config import parse_model_config
from server.retraining.embedded import EmbeddedJobQueue
from server.retraining.triggers import Cooldown, Triggers


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


class Registry:
    def __init__(self, tmp_path, retraining=None, entry_point=True):
        d = tmp_path / "m-dir"
        d.mkdir(parents=True, exist_ok=True)
        if entry_point:
            (d / "training.json").write_text(json.dumps({"entry_point": "examples.digits_cnn:retrain"}))
        raw = {} if retraining is None else {"retraining": retraining}
        self.mv = SimpleNamespace(name="m", version="1.0", config=parse_model_config(raw),
                                  archive=SimpleNamespace(model_dir=d))

    def get(self, name, version=None):
        if name != "m" or version not in (None, "1.0"):
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found: {name}")
        return self.mv

    def all_versions(self):
        return [self.mv]

    def default_version(self, name):
        return "1.0"


class Monitor:
    def __init__(self):
        self.drift = {"detected": False, "episodes": 0}
        self.quality = {"degraded": False, "windows": 0}

    def status(self, model, version):
        return {"drift": dict(self.drift), "quality": dict(self.quality)}


class DownQueue:
    """The embedded queue behind a switch that makes submit fail like Redis down."""

    def __init__(self, inner):
        self.inner, self.down = inner, False

    async def submit(self, *a, **k):
        if self.down:
            raise ConnectionError("redis down")
        return await self.inner.submit(*a, **k)

    async def list(self, *a, **k):
        return await self.inner.list(*a, **k)

    async def get(self, job_id):
        if self.down:
            raise ConnectionError("redis down")
        return await self.inner.get(job_id)


def make(tmp_path, retraining=None, **kw):
    reg, mon = Registry(tmp_path, retraining if retraining is not None else {"cooldown": 0}, **kw), Monitor()
    queue = DownQueue(EmbeddedJobQueue(tmp_path / "store"))
    clock = Clock()
    return Triggers(reg, mon, queue, Cooldown(clock=clock), params={"model_store": "x"}), mon, queue, clock


def run(coro):
    return asyncio.run(coro)


def test_a_drift_episode_starts_one_job_however_often_it_is_seen(tmp_path):
    t, mon, queue, _ = make(tmp_path)
    run(t.poll())
    assert run(queue.list("m")) == []
    mon.drift = {"detected": True, "episodes": 1}
    for _ in range(3):
        run(t.poll())
    jobs = run(queue.list("m"))
    assert [(j.trigger, j.episode) for j in jobs] == [("drift", "drift:1.0:1")]
    # another replica (a second Triggers on the same queue) seeing the same episode: no new job
    t2 = Triggers(t.registry, mon, queue, Cooldown(), params={})
    run(t2.poll())
    assert len(run(queue.list("m"))) == 1
    mon.drift = {"detected": True, "episodes": 2}  # the next episode: a new job
    run(t.poll())
    assert sorted(j.episode for j in run(queue.list("m"))) == ["drift:1.0:1", "drift:1.0:2"]


def test_the_cooldown_keeps_a_second_trigger_of_the_model_from_starting_a_job(tmp_path):
    t, mon, queue, clock = make(tmp_path, {"cooldown": 60})
    mon.quality = {"degraded": True, "windows": 3}
    run(t.poll())
    mon.drift = {"detected": True, "episodes": 1}
    run(t.poll())
    assert [j.trigger for j in run(queue.list("m"))] == ["quality"]
    clock.t = 61.0
    mon.drift = {"detected": True, "episodes": 2}
    run(t.poll())
    assert sorted(j.trigger for j in run(queue.list("m"))) == ["drift", "quality"]


def _end(queue, job, result: dict) -> None:
    """The job ends as the pipeline's return ``result`` says (what a worker records)."""
    from server.retraining.runner import Outcome, finish_record

    finish_record(job, Outcome(result["state"], result=result, returned=True))
    queue.inner._write(job)


def test_a_job_rejected_for_too_few_labels_does_not_hold_the_cooldown(tmp_path):
    """A drift episode often opens before labels arrive: its job ends rejected for too few
    labelled rows, having trained nothing. The degraded quality that follows once labels came
    must start a job, not find the cooldown taken; a job that trained (gate rejected) keeps it."""
    t, mon, queue, clock = make(tmp_path, {"cooldown": 600})
    mon.drift = {"detected": True, "episodes": 1}
    run(t.poll())
    [drift] = run(queue.list("m"))
    run(t.poll())  # still queued: nothing is released
    mon.quality = {"degraded": True, "windows": 2}
    run(t.poll())
    assert [j.trigger for j in run(queue.list("m"))] == ["drift"]  # cooling
    _end(queue, drift, {"state": "rejected", "reason": "too_few_labels", "labels": 0, "min_labels": 200,
                        "message": "0 labelled production rows for m; retraining needs min_labels 200"})
    run(t.poll())  # the drift job released the cooldown
    mon.quality = {"degraded": True, "windows": 4}  # the next window, still degraded: a new episode
    run(t.poll())
    jobs = {j.trigger: j for j in run(queue.list("m"))}
    assert sorted(jobs) == ["drift", "quality"]
    _end(queue, jobs["quality"], {"state": "rejected", "gate": {"accuracy": 0.5}, "message": "gate: worse"})
    run(t.poll())
    mon.drift = {"detected": True, "episodes": 2}
    run(t.poll())
    assert sorted(j.trigger for j in run(queue.list("m"))) == ["drift", "quality"]  # that one trained: cooling
    # an alert for an episode whose job exists starts nothing and leaves the cooldown as it was
    clock.t = 601.0
    payload = {"alerts": [{"status": "firing", "labels": {"alertname": "OspreyDriftDetected", "model": "m",
                                                          "version": "1.0"}}]}
    mon.drift = {"detected": True, "episodes": 1}
    assert run(t.alert(payload))["jobs"] == []
    assert t.cooldown.take("m", 600)  # not taken by the alert


def test_a_late_rejection_ends_only_its_own_cooldown(tmp_path):
    """A job waits past its cooldown, another trigger takes the next one, then the first job is
    rejected for too few labels: the second cooldown stays (it belongs to another job)."""
    t, mon, queue, clock = make(tmp_path, {"cooldown": 600})
    mon.drift = {"detected": True, "episodes": 1}
    run(t.poll())
    [first] = run(queue.list("m"))
    clock.t = 700.0  # the first cooldown is over
    mon.quality = {"degraded": True, "windows": 2}
    run(t.poll())
    assert sorted(j.trigger for j in run(queue.list("m"))) == ["drift", "quality"]
    _end(queue, first, {"state": "rejected", "reason": "too_few_labels", "message": "0 labelled rows"})
    run(t.poll())
    mon.drift = {"detected": True, "episodes": 2}
    run(t.poll())
    assert sorted(j.trigger for j in run(queue.list("m"))) == ["drift", "quality"]  # still cooling


def test_a_trigger_the_queue_refused_does_not_find_its_own_cooldown_later(tmp_path):
    t, mon, queue, _ = make(tmp_path, {"cooldown": 600})
    queue.down = True
    mon.drift = {"detected": True, "episodes": 1}
    run(t.poll())
    assert len(t.pending) == 1 and run(queue.inner.list("m")) == []
    queue.down = False
    run(t.poll())  # delivered: the failed submit gave the cooldown back
    assert [j.episode for j in run(queue.list("m"))] == ["drift:1.0:1"]


def test_triggers_not_listed_in_the_section_start_nothing(tmp_path):
    t, mon, queue, _ = make(tmp_path, {"triggers": ["manual"], "cooldown": 0})
    mon.drift = {"detected": True, "episodes": 1}
    mon.quality = {"degraded": True, "windows": 1}
    run(t.poll())
    assert run(queue.list("m")) == []


def test_a_trigger_the_queue_cannot_take_is_kept_and_delivered_once_later(tmp_path):
    t, mon, queue, _ = make(tmp_path)
    queue.down = True
    mon.drift = {"detected": True, "episodes": 1}
    run(t.poll())
    run(t.poll())
    assert len(t.pending) == 1
    queue.down = False
    run(t.poll())
    run(t.poll())
    assert t.pending == [] and [j.episode for j in run(queue.list("m"))] == ["drift:1.0:1"]


def test_manual_retrain_reuses_a_queued_job_and_names_what_is_wrong(tmp_path):
    t, _, queue, _ = make(tmp_path)
    job, created = run(t.manual("m"))
    assert created and job.trigger == "manual"
    again, created2 = run(t.manual("m"))
    assert not created2 and again.id == job.id
    with pytest.raises(OspreyError) as e:
        run(t.manual("nope"))
    assert e.value.kind is ErrorKind.NOT_FOUND
    queue.down = True
    t2, _, q2, _ = make(tmp_path / "b")
    q2.down = True
    with pytest.raises(OspreyError) as e:
        run(t2.manual("m"))
    assert e.value.kind is ErrorKind.UNAVAILABLE and "nothing was queued" in e.value.message
    assert t2.pending == []  # a person retries: kept as well, it could become a second job


def test_a_model_without_an_entry_point_cannot_be_retrained(tmp_path):
    t, _, _, _ = make(tmp_path, entry_point=False)
    with pytest.raises(OspreyError) as e:
        run(t.manual("m"))
    assert e.value.kind is ErrorKind.BAD_INPUT and "no training entry point" in e.value.message


def test_alertmanager_webhook_starts_the_monitors_job_for_the_same_episode(tmp_path):
    t, mon, queue, _ = make(tmp_path)
    mon.drift = {"detected": True, "episodes": 4}
    payload = {"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "OspreyDriftDetected", "model": "m", "version": "1.0"},
         "fingerprint": "abc", "startsAt": "2026-11-29T10:00:00Z"},
        {"status": "firing", "labels": {"alertname": "HighCPU"}},
        {"status": "resolved", "labels": {"alertname": "OspreyDriftDetected", "model": "m"}},
        {"status": "firing", "labels": {"alertname": "OspreyQualityDegraded"}},
    ]}
    out = run(t.alert(payload))
    assert out["ignored"] == 2 and len(out["jobs"]) == 1 and "has no model label" in out["errors"][0]
    run(t.poll())  # the monitor's own trigger for episode 4: the same job
    assert [(j.trigger, j.episode) for j in run(queue.list("m"))] == [("alert", "drift:1.0:4")]
    for bad in ({"alerts": "x"}, [], "text"):
        with pytest.raises(OspreyError) as e:
            run(t.alert(bad))
        assert e.value.kind is ErrorKind.BAD_INPUT and "Alertmanager" in e.value.message


def test_the_latency_watch_judges_the_requests_since_its_last_verdict():
    from server.retraining.triggers import LatencyWatch

    counts = {"n": 0, "over": 0}
    watch = LatencyWatch(lambda m, v: (counts["n"], counts["over"]), min_requests=100)
    counts.update(n=50, over=50)
    assert watch("m", "1.0") is False  # too few requests to judge
    counts.update(n=200, over=60)  # 150 since the start, 60 slow: breached
    assert watch("m", "1.0") is True
    counts.update(n=250, over=60)  # 50 more: too few, the verdict stands
    assert watch("m", "1.0") is True
    counts.update(n=400, over=61)  # 200 more, 1 slow (0.5%): fine again
    assert watch("m", "1.0") is False


def test_a_latency_breach_sustained_for_latency_for_s_starts_one_job(tmp_path):
    t, _, queue, _ = make(tmp_path, {"triggers": ["latency"], "cooldown": 0})
    breached = {"now": True}
    t.latency_breached = lambda m, v: breached["now"]
    t.latency_for_s = 0.0
    run(t.poll())
    run(t.poll())
    jobs = run(queue.list("m"))
    assert [j.trigger for j in jobs] == ["latency"]


def test_serving_metrics_count_the_requests_slower_than_the_p99_objective():
    from monitoring.metrics import ServingMetrics

    metrics = ServingMetrics(objectives=(0.5,))
    for proto, seconds in (("rest", 0.1), ("rest", 0.7), ("grpc", 0.5), ("grpc", 2.0)):
        metrics.request_seconds.child("m", "1.0", proto).observe(seconds)
    metrics.request_seconds.child("m", "2.0", "rest").observe(9.0)
    assert metrics.over_objective("m", "1.0") == (4, 2)  # 0.5 s is within the objective (le is inclusive)
    assert ServingMetrics(objectives=()).over_objective("m", "1.0") is None
