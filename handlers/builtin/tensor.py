"""``tensor``: input to tensor, forward, output as a list (TorchServe BaseHandler's default).

A request body is a JSON (nested) list of numbers for one example; the batch is stacked
along a new first dimension, and each request gets its row of the output as a list.
"""

from __future__ import annotations

from ..base import BaseHandler

__all__ = ["TensorHandler"]


class TensorHandler(BaseHandler):
    pass
