"""What an instance runs: the handler named by an archive, resolved the way TorchServe
resolves it (plus Osprey's built-ins), and the device an instance is placed on."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from handlers.builtin import BUILTIN_HANDLERS, builtin_handler_class
from handlers.context import Context
from handlers.envelopes import wrap_handle
from handlers.loading import import_handler_module, list_classes

from server.core.model_config import ModelConfig

__all__ = ["Service", "make_service", "gpu_for", "builtin_handler_names"]

log = logging.getLogger("osprey.instances")


def builtin_handler_names() -> list[str]:
    """The names ``--handler`` / a manifest's ``handler`` may give for a built-in handler."""
    return sorted(BUILTIN_HANDLERS)


@dataclass
class Service:
    """A loaded handler: what to call to initialize it and to handle a batch."""

    initialize: Callable[[Context], Any] | None
    handle: Callable[[list, Context], list]
    target: Any
    accepts_tensors: bool = False


def make_service(model_dir: str, handler: str, envelope: str = "") -> Service:
    """Resolve a manifest ``handler`` the way TorchServe does (plus Osprey's built-ins); with
    ``envelope`` (the server's ``service_envelope``), its entry point is wrapped in that request
    envelope (handlers/envelopes.py), as TorchServe's model loader does, unless the handler takes
    tensors itself."""
    module_name, _, fn = handler.partition(":")
    if module_name.endswith(".py"):
        module_name = module_name[:-3]
    fn = fn or "handle"
    local_file = os.path.isfile(os.path.join(model_dir, f"{module_name}.py"))
    cls = None if local_file else builtin_handler_class(module_name)
    if cls is None:
        try:
            module = import_handler_module(model_dir, module_name)
        except ModuleNotFoundError as exc:
            if local_file or exc.name not in (module_name, module_name.split(".")[0]):
                raise
            try:  # TorchServe's own built-in handlers, when the torchserve package is installed
                module = import_handler_module(model_dir, f"ts.torch_handler.{module_name}")
            except ModuleNotFoundError:
                raise ValueError(f"handler {handler!r} is neither a file in the archive nor a built-in handler") from None
        func = getattr(module, fn, None)
        if callable(func) and not isinstance(func, type):
            # TorchServe initializes a module-level entry point by calling it with no data.
            return Service(lambda ctx, _f=func: _f(None, ctx), wrap_handle(func, envelope), module)
        classes = list_classes(module)
        with_fn = [c for c in classes if hasattr(c, fn)]
        if len(with_fn) == 1:
            cls = with_fn[0]
        else:
            raise ValueError(f"handler {handler!r} must define a function {fn}(data, context) or exactly one "
                             f"class with {fn}(); found {len(with_fn)} such classes")
    obj = cls()
    tensors = bool(getattr(obj, "accepts_tensors", False))
    handle = getattr(obj, fn)
    return Service(getattr(obj, "initialize", None), handle if tensors else wrap_handle(handle, envelope), obj, tensors)


def gpu_for(config: ModelConfig, index: int) -> int | None:
    """The CUDA device of instance ``index``: None on CPU or where no GPU is present."""
    if config.device_type == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        if config.device_type == "gpu":
            log.warning("deviceType gpu asked for but CUDA is not available; using the CPU")
        return None
    ids = config.device_ids or tuple(range(torch.cuda.device_count()))
    return ids[index % len(ids)]
