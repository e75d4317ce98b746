"""Model instances: the only code that imports ``handlers/`` and runs handler code.

:func:`thread_factory` makes the registry's instances (threads in this process)."""

from __future__ import annotations

from typing import Callable

from server.core.instance import InstanceFactory

__all__ = ["thread_factory"]


def thread_factory(metrics_sink: Callable | None = None) -> InstanceFactory:
    from server.instances.service import gpu_for
    from server.instances.thread import ModelInstance

    def make(name, version, archive, config, index):
        return ModelInstance(name, version, archive, config, index, gpu_for(config, index), metrics_sink)
    return make
