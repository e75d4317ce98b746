"""Feedback labels joined by request id, and the live quality of each model version.

See :mod:`monitoring.quality.monitor` (the join, windows, Prometheus lines),
:mod:`monitoring.quality.metrics` (metrics, baseline, judgement) and
:mod:`monitoring.quality.store` (in-process or Redis state).
"""

from monitoring.quality.metrics import load_baseline
from monitoring.quality.monitor import QualityMonitor, QualityPart, quality_factory, render_many, resolve_label
from monitoring.quality.store import MemoryStore, RedisStore, StoreUnavailable

__all__ = ["QualityMonitor", "QualityPart", "quality_factory", "render_many", "resolve_label", "load_baseline",
           "MemoryStore", "RedisStore", "StoreUnavailable"]
