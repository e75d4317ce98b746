"""Job records: JSON both ways, bounded log and steps, params checked at submit."""

from __future__ import annotations

import json

import pytest

from server.core.errors import ErrorKind, OspreyError
from server.retraining.jobs import LOG_TAIL_LINES, MAX_LINE_CHARS, MAX_STEPS, JobRecord, JobState
from server.retraining.queue import new_record, resolve_task, retry_delay
from server.retraining.runner import finish_record, outcome_of


def test_record_round_trips_through_json():
    r = new_record("digits", "1.0", "drift", "drift:3", {"task": "a.b:c", "dir": "/x"})
    r.add_step("training", "epoch 1")
    r.add_log("line one\nline two")
    r.gate = {"accuracy": 0.9}
    r.state = JobState.RUNNING
    back = JobRecord.from_json(json.dumps(json.loads(r.to_json())))
    assert back == r and back.state is JobState.RUNNING
    assert back.log_tail == ["line one", "line two"] and back.params["task"] == "a.b:c"
    assert back.max_attempts == 3 and back.summary()["steps"] == 1 and "log_tail" not in back.summary()
    assert JobRecord.from_dict({**r.as_dict(), "from_a_newer_writer": 1}) == r


def test_log_tail_and_steps_are_bounded():
    r = new_record("m", "1", "manual", "manual:1", {})
    for i in range(LOG_TAIL_LINES + 50):
        r.add_log(f"line {i}")
    r.add_log("x" * (MAX_LINE_CHARS + 10))
    assert len(r.log_tail) == LOG_TAIL_LINES and r.log_tail[-1].endswith("[cut]")
    assert r.log_tail[0] == "line 51"
    for i in range(MAX_STEPS + 10):
        r.add_step(f"s{i}")
    assert len(r.steps) == MAX_STEPS and r.steps[0]["step"] == "s0" and r.steps[-1]["step"] == f"s{MAX_STEPS + 9}"


@pytest.mark.parametrize("kwargs, message", [
    ({"trigger": "cron"}, "unknown trigger 'cron'"),
    ({"episode": ""}, "episode must be a non-empty string"),
    ({"params": {"task": "nocolon"}}, "params['task'] must be 'module:function'"),
    ({"params": {"max_attempts": 0}}, "params['max_attempts'] must be a positive number"),
    ({"params": {"backoff_s": "soon"}}, "params['backoff_s'] must be a positive number"),
    ({"params": {"x": object()}}, "params must be JSON data"),
])
def test_bad_submissions_are_refused_naming_what(kwargs, message):
    args = {"model": "m", "version": "1", "trigger": "drift", "episode": "drift:1", "params": {}, **kwargs}
    with pytest.raises(OspreyError) as err:
        new_record(**args)
    assert err.value.kind is ErrorKind.BAD_INPUT and message in err.value.message


def test_record_from_bad_data_says_what():
    with pytest.raises(ValueError, match="lacks model"):
        JobRecord.from_dict({"id": "x", "version": "1", "trigger": "drift", "episode": "e"})
    with pytest.raises(ValueError, match="unknown state 'lost'"):
        JobRecord.from_dict({"id": "x", "model": "m", "version": "1", "trigger": "drift", "episode": "e",
                             "state": "lost"})


def test_task_names_and_backoff():
    assert resolve_task("json:dumps") is json.dumps
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        resolve_task("no_such_mod:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        resolve_task("json:nope")
    assert [retry_delay({"backoff_s": 10}, a) for a in (1, 2, 3)] == [10, 20, 40]


def test_outcomes():
    assert outcome_of({"result": {"state": "rejected", "gate": {}}}, 0).kind == "rejected"
    assert outcome_of({"result": {"state": "weird"}}, 0).kind == "failed"
    plain = JobRecord(id="x", model="m", version="1", trigger="manual", episode="e")
    finish_record(plain, outcome_of({"result": {}}, 0))
    assert plain.state is JobState.SUCCEEDED and plain.progress == 1.0 and plain.error is None
    judged = JobRecord(id="y", model="m", version="1", trigger="manual", episode="e")
    finish_record(judged, outcome_of({"result": {"state": "failed", "message": "version 1 is gone", "gate": {"a": 1}}}, 0))
    assert judged.state is JobState.FAILED and judged.message == "version 1 is gone" and judged.gate == {"a": 1}
    assert judged.error == "version 1 is gone"
    assert outcome_of({"error": "tb", "message": "m", "retryable": True}, 0).kind == "retry"
    assert "killed by signal 9" in outcome_of(None, -9).message
