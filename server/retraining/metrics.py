"""Prometheus families of the retraining loop, from the job records (every replica sees them).

``refresh`` (awaited by the triggers' poll, off the request path) reads the records once per
poll; ``render`` (the /metrics scrape, on the loop) formats that snapshot and never waits on
Redis or the disk. Counts come from the records, which the queue keeps for
``retraining_job_ttl``: every replica reports the same numbers (aggregate with ``max``).

- ``osprey_retraining_jobs_total{model,trigger,result}``: finished jobs by result
  (succeeded, rejected, failed, cancelled);
- ``osprey_retraining_jobs{model,state}``: jobs queued and running now;
- ``osprey_retraining_job_duration_seconds{model,result}``: a summary (sum and count) of the
  finished jobs' run time;
- ``osprey_retraining_last_finished_timestamp_seconds{model,result}``: when the latest job of
  that result finished (epoch seconds). The alert on failed jobs reads it (``time() - x < 3600``)
  rather than ``increase()`` of the counter, which misses the first failure of a model (the
  series appears already at 1) and counts a record expiring (``retraining_job_ttl``) as a reset.

Traffic (default version, canary share, shadow results) is rendered by the serving metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from monitoring.families import escape, fmt, render_family

__all__ = ["JobMetrics"]

log = logging.getLogger("osprey.retraining")


class JobMetrics:
    def __init__(self, queue: Any, limit: int = 10_000):
        self.queue, self.limit = queue, limit
        self._snapshot: list = []

    async def refresh(self) -> None:
        try:
            self._snapshot = await self.queue.list(None, self.limit)
        except Exception as exc:  # Redis down: keep the last snapshot
            log.debug("job metrics not refreshed: %s", exc)

    def render(self) -> str:
        done: Counter = Counter()
        now: Counter = Counter()
        dur_sum: Counter = Counter()
        dur_n: Counter = Counter()
        last: dict = {}
        for job in self._snapshot:
            state = str(getattr(job.state, "value", job.state))
            if state in ("queued", "running"):
                now[(job.model, state)] += 1
                continue
            done[(job.model, job.trigger, state)] += 1
            if job.finished:
                last[(job.model, state)] = max(last.get((job.model, state), 0.0), float(job.finished))
            if job.started and job.finished:
                dur_sum[(job.model, state)] += max(job.finished - job.started, 0.0)
                dur_n[(job.model, state)] += 1
        out = []
        lines = [f'osprey_retraining_jobs_total{{model="{escape(m)}",trigger="{escape(t)}",result="{r}"}} {n}\n'
                 for (m, t, r), n in sorted(done.items())]
        if lines:
            out.append(render_family("osprey_retraining_jobs_total", "counter",
                                     "Retraining jobs finished, by model, trigger and result.", lines))
        models = sorted({j.model for j in self._snapshot})
        lines = [f'osprey_retraining_jobs{{model="{escape(m)}",state="{s}"}} {now[(m, s)]}\n'
                 for m in models for s in ("queued", "running")]
        if lines:
            out.append(render_family("osprey_retraining_jobs", "gauge", "Retraining jobs queued and running now.",
                                     lines))
        lines = []
        for key in sorted(dur_n):
            labels = f'model="{escape(key[0])}",result="{key[1]}"'
            lines.append(f"osprey_retraining_job_duration_seconds_sum{{{labels}}} {fmt(dur_sum[key])}\n")
            lines.append(f"osprey_retraining_job_duration_seconds_count{{{labels}}} {dur_n[key]}\n")
        if lines:
            out.append(render_family("osprey_retraining_job_duration_seconds", "summary",
                                     "Run time of finished retraining jobs.", lines))
        lines = [f'osprey_retraining_last_finished_timestamp_seconds{{model="{escape(m)}",result="{r}"}} '
                 f'{fmt(t)}\n' for (m, r), t in sorted(last.items())]
        if lines:
            out.append(render_family("osprey_retraining_last_finished_timestamp_seconds", "gauge",
                                     "When the latest retraining job of the model with that result finished "
                                     "(epoch seconds).", lines))
        return "".join(out)
