"""The monitor a server runs: in its own process or in the server's (setting ``monitor_isolation``).

:func:`build_monitor` assembles the in-process :class:`~monitoring.monitor.Monitor` (drift,
its quality part per version from ``monitoring.quality``, and the labelled production data
retraining jobs read, ``monitoring.dataset``); the monitor process builds the same one.
:func:`open_monitor` is what ``server.serve`` calls: that monitor, or with
``monitor_isolation=process`` a :class:`~monitoring.remote.RemoteMonitor` in front of one
running in a child process.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["build_monitor", "open_monitor"]


def build_monitor(settings: Any, resolve: Callable[[str, str], Any], **kwargs: Any):
    from monitoring.dataset import LabelledData
    from monitoring.monitor import Monitor
    from monitoring.quality import quality_factory

    def quality(model, version, config, model_dir, store):
        return quality_factory(model, version, config, model_dir, settings.redis_url or None)
    redis = None
    if settings.redis_url:
        import redis as redis_lib

        redis = redis_lib.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    dataset = LabelledData(settings.model_store, redis=redis, state_dir=settings.state_dir or None)
    return Monitor(settings, resolve, quality, dataset=dataset, **kwargs)


def open_monitor(settings: Any, resolve: Callable[[str, str], Any]):
    """The server's monitor; ``resolve(model, version)`` is the registry's version or None."""
    if getattr(settings, "monitor_isolation", "process") == "process":
        from monitoring.remote import RemoteMonitor

        return RemoteMonitor(settings, resolve)
    return build_monitor(settings, resolve)
