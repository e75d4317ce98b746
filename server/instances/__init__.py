"""Model instances: the only code that imports ``handlers/`` and runs handler code.

:func:`thread_factory` makes the registry's instances (threads in this process)."""

from __future__ import annotations

from typing import Callable

from server.core.instance import InstanceFactory

__all__ = ["thread_factory", "forget_model_folder", "return_device_memory"]


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


def thread_factory(metrics_sink: Callable | None = None) -> InstanceFactory:
    from server.instances.service import gpu_for
    from server.instances.thread import ModelInstance

    def make(name, version, archive, config, index):
        return ModelInstance(name, version, archive, config, index, gpu_for(config, index), metrics_sink)
    return make
