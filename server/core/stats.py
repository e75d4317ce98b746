"""Per-version live counters the promoter reads: requests, errors, latency.

One :class:`VersionStats` lives on each :class:`~server.core.registry.ModelVersion` (so an
unregistered version's counters go with it, and a version registered again starts at zero);
the data plane's observer :func:`count` updates it when a request ends. Four numbers, no
allocation on the request path.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["VersionStats", "count"]


class VersionStats:
    """``requests``: every request that reached the version (answered, failed, cancelled);
    ``errors``: those that ended with a 5xx status (handler failure, crash, queue full,
    deadline); ``latency_sum_s`` / ``latency_count``: end-to-end seconds of the answered
    (status < 400) ones."""

    __slots__ = ("requests", "errors", "latency_sum_s", "latency_count")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency_sum_s = 0.0
        self.latency_count = 0

    def add(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        elif status < 400:
            self.latency_sum_s += seconds
            self.latency_count += 1

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latency_sum_s": self.latency_sum_s,
                "latency_count": self.latency_count}


def count(mv: Any, ticket: Any, outcome: Any) -> None:
    """Data plane observer: one request of ``mv`` ended with ``outcome`` (a response or an error)."""
    if mv is not None:
        received = ticket.timings.received
        mv.stats.add(getattr(outcome, "status", 500), time.monotonic() - received if received else 0.0)
