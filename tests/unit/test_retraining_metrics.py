"""The retraining job families on /metrics, rendered from a snapshot of job records."""

from __future__ import annotations

import asyncio

from server.retraining.jobs import JobRecord, JobState
from server.retraining.metrics import JobMetrics


class _Queue:
    def __init__(self, records):
        self.records = records

    async def list(self, model, limit):
        return self.records


def _job(i, state, trigger="manual", model="digits_cnn", started=None, finished=None):
    return JobRecord(id=f"j{i}", model=model, version="1.0", trigger=trigger, episode=f"e{i}", state=state,
                     started=started, finished=finished)


def test_job_families_count_by_result_and_give_the_latest_finish_per_result():
    m = JobMetrics(_Queue([
        _job(1, JobState.FAILED, started=1000.0, finished=1010.0),
        _job(2, JobState.FAILED, trigger="drift", started=2000.0, finished=2030.5),
        _job(3, JobState.REJECTED, started=1500.0, finished=1520.0),
        _job(4, JobState.RUNNING, started=3000.0),
        _job(5, JobState.QUEUED),
        _job(6, JobState.SUCCEEDED, model="other", started=100.0, finished=160.0),
    ]))
    asyncio.run(m.refresh())
    text = m.render()
    lines = set(text.splitlines())
    for line in ('osprey_retraining_jobs_total{model="digits_cnn",trigger="manual",result="failed"} 1',
                 'osprey_retraining_jobs_total{model="digits_cnn",trigger="drift",result="failed"} 1',
                 'osprey_retraining_jobs_total{model="digits_cnn",trigger="manual",result="rejected"} 1',
                 'osprey_retraining_jobs{model="digits_cnn",state="running"} 1',
                 'osprey_retraining_jobs{model="digits_cnn",state="queued"} 1',
                 'osprey_retraining_jobs{model="other",state="running"} 0',
                 'osprey_retraining_job_duration_seconds_count{model="digits_cnn",result="failed"} 2',
                 'osprey_retraining_job_duration_seconds_sum{model="digits_cnn",result="failed"} 40.5',
                 'osprey_retraining_last_finished_timestamp_seconds{model="digits_cnn",result="failed"} 2030.5',
                 'osprey_retraining_last_finished_timestamp_seconds{model="digits_cnn",result="rejected"} 1520.0',
                 'osprey_retraining_last_finished_timestamp_seconds{model="other",result="succeeded"} 160.0'):
        assert line in lines or line + ".0" in lines, (line, text)
    assert "# TYPE osprey_retraining_last_finished_timestamp_seconds gauge" in text


def test_no_records_no_families():
    m = JobMetrics(_Queue([]))
    asyncio.run(m.refresh())
    assert m.render() == ""
