"""Handlers: the code that turns requests into model inputs and model outputs into answers.

``BaseHandler`` is Osprey's base class (preprocess -> inference -> postprocess);
``Context`` has TorchServe's context API; built-in handlers live in ``handlers.builtin``.
"""

from .base import BaseHandler, body_of
from .context import Context, RequestProcessor
from .errors import InvalidInput, PredictionException
from .metrics import HandlerMetrics, MetricTypes

__all__ = ["BaseHandler", "body_of", "Context", "RequestProcessor", "InvalidInput",
           "PredictionException", "HandlerMetrics", "MetricTypes"]
