"""Built-in handlers, usable in any archive by name (``--handler NAME``)."""

from __future__ import annotations

import importlib

__all__ = ["BUILTIN_HANDLERS", "builtin_handler_class"]

BUILTIN_HANDLERS = {
    "tensor": "handlers.builtin.tensor:TensorHandler",
    "base_handler": "handlers.builtin.tensor:TensorHandler",
    "image_classifier": "handlers.builtin.image_classifier:ImageClassifier",
    "text_classifier": "handlers.builtin.text_classifier:TextClassifier",
    "text_embedding": "handlers.builtin.text_embedding:TextEmbedding",
    "tabular": "handlers.builtin.tabular:TabularHandler",
    "generator": "handlers.builtin.generator:GeneratorHandler",
    "anomaly": "handlers.builtin.anomaly:AnomalyHandler",
}


def builtin_handler_class(name: str) -> type | None:
    target = BUILTIN_HANDLERS.get(name)
    if target is None:
        return None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
