"""Osprey's handler base class: ``initialize`` then ``preprocess -> inference -> postprocess``.

The same contract as TorchServe's BaseHandler, so a handler written for one is easy to
move to the other; it loads TorchScript, eager (state_dict or safetensors) and
``torch.export`` models, picks the device from the context, runs inference under
``torch.inference_mode`` and records how long each stage took in ``context.stage_times``.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import InvalidInput
from .loading import load_model

__all__ = ["BaseHandler", "body_of"]


def body_of(row: dict) -> Any:
    """The payload of one request: its ``data`` or ``body`` field (form or raw body)."""
    if "data" in row:
        return row["data"]
    if "body" in row:
        return row["body"]
    if len(row) == 1:
        return next(iter(row.values()))
    raise InvalidInput("request has no body")


class BaseHandler:
    #: True for handlers that take Open Inference Protocol tensors (name -> ndarray)
    accepts_tensors = False

    def __init__(self) -> None:
        self.model: Any = None
        self.device: Any = None
        self.context: Any = None
        self.initialized = False

    # --- lifecycle ------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        import torch

        self.context = context
        props = context.system_properties
        gpu = props.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu}")
        else:
            self.device = torch.device("cpu")
        model = context.manifest.get("model", {})
        self.model = load_model(props.get("model_dir"), model.get("serializedFile"),
                                model.get("modelFile"), self.device)
        self.initialized = True

    @property
    def config(self) -> dict:
        """The ``handler:`` section of model-config.yaml."""
        cfg = (self.context.model_yaml_config or {}) if self.context else {}
        return cfg.get("handler") or {}

    # --- the pipeline ---------------------------------------------------------------
    def preprocess(self, data: list[dict]) -> Any:
        import torch

        rows = []
        for i, row in enumerate(data):
            value = body_of(row)
            try:
                rows.append(torch.as_tensor(value, dtype=torch.float32))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise InvalidInput(f"request {i}: body is not a numeric array ({exc})") from None
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise InvalidInput(f"requests in one batch have different shapes: {sorted(shapes)}")
        return torch.stack(rows).to(self.device)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(data, *args, **kwargs)

    def postprocess(self, data: Any) -> list:
        return data.tolist()

    def handle(self, data: list[dict], context: Any) -> list:
        self.context = context
        t0 = time.perf_counter()
        x = self.preprocess(data)
        t1 = time.perf_counter()
        y = self.inference(x)
        t2 = time.perf_counter()
        out = self.postprocess(y)
        t3 = time.perf_counter()
        times = getattr(context, "stage_times", None)
        if times is not None:
            times["preprocess"], times["inference"], times["postprocess"] = t1 - t0, t2 - t1, t3 - t2
        return out
