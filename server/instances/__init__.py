"""Model instances: the only code that imports ``handlers/`` and runs handler code.

:func:`instance_factory` makes the registry's instances: threads in this process
(:func:`thread_factory`) or child processes (:func:`process_factory`), per model by its
model-config.yaml ``isolation``, else the server's ``instance_isolation``."""

from __future__ import annotations

from typing import Callable

from server.core.instance import InstanceFactory

__all__ = ["thread_factory", "process_factory", "instance_factory", "forget_model_folder", "return_device_memory",
           "canonical_envelope"]


def canonical_envelope(name: str) -> str:
    """A ``service_envelope`` setting as the envelope it names ('' for none; TorchServe's older
    kfserving names mapped); ValueError naming the choices (handlers/envelopes.py)."""
    from handlers.envelopes import canonical_envelope as canonical

    return canonical(name)


def forget_model_folder(model_dir: str) -> None:
    """A model version is released: drop its folder from the import path and its modules."""
    from handlers.loading import forget_folder

    forget_folder(model_dir)


def return_device_memory() -> None:
    """Give the GPU memory torch's caching allocator keeps for freed tensors back to the
    device (after a model was released); nothing when CUDA was never used."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def thread_factory(metrics_sink: Callable | None = None, observe: Callable | None = None,
                   envelope: str = "") -> InstanceFactory:
    from server.instances.service import gpu_for
    from server.instances.thread import ModelInstance

    def make(name, version, archive, config, index):
        return ModelInstance(name, version, archive, config, index, gpu_for(config, index), metrics_sink, observe,
                             envelope)
    return make


def process_factory(metrics_sink: Callable | None = None, torch_threads: int = 0,
                    observe: Callable | None = None, envelope: str = "", forward_output: bool = False,
                    monitor_link: tuple | None = None) -> InstanceFactory:
    from server.instances.process import ProcessInstance
    from server.instances.service import gpu_for

    def make(name, version, archive, config, index):
        return ProcessInstance(name, version, archive, config, index, gpu_for(config, index), metrics_sink,
                               torch_threads, observe, envelope, forward_output, monitor_link)
    return make


def instance_factory(settings, metrics_sink: Callable | None = None, observe: Callable | None = None,
                     monitor_link: tuple | None = None) -> InstanceFactory:
    """Threads or processes, chosen per model version (config.isolation, else settings.instance_isolation).

    ``observe`` is the monitor's ``observe(obs)`` (a constant-cost, thread-safe append), or None
    to capture nothing; it is also None-ed here when the server setting ``monitoring`` is off.
    Thread instances call it from their own thread, process instances from the thread that
    reads their child (the child computes the observation and sends it after its answers);
    models with ``monitoring.enabled: false`` are never captured. ``monitor_link`` (address,
    key) is a monitor process's socket: process instances then send their observations (and
    inputs held for retraining) there themselves (server.instances.monitor_link)."""
    if not getattr(settings, "monitoring", True):
        observe = None
    envelope = getattr(settings, "service_envelope", "")  # every handler's entry point is wrapped in it
    threads = thread_factory(metrics_sink, observe, envelope)
    # with TorchServe's log files (log_location), a child's print and logging go through the server
    # to model_log.log; without them it writes to the server's stdout and stderr itself
    processes = process_factory(metrics_sink, settings.torch_threads, observe, envelope,
                                bool(getattr(settings, "log_location", "")), monitor_link if observe else None)

    def make(name, version, archive, config, index):
        kind = config.isolation or settings.instance_isolation
        return (processes if kind == "process" else threads)(name, version, archive, config, index)
    return make
