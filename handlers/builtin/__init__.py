"""Built-in handlers, usable in any archive by name (``--handler NAME``)."""

from __future__ import annotations

import importlib

__all__ = ["BUILTIN_HANDLERS", "builtin_handler_class"]

BUILTIN_HANDLERS = {
    "tensor": "handlers.builtin.tensor:TensorHandler",
    "base_handler": "handlers.builtin.tensor:TensorHandler",
    "image_classifier": "handlers.builtin.image_classifier:ImageClassifier",
}


def builtin_handler_class(name: str) -> type | None:
    target = BUILTIN_HANDLERS.get(name)
    if target is None:
        return None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
