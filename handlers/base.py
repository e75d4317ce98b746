"""Osprey's handler base class: ``initialize`` then ``preprocess -> inference -> postprocess``.

The same contract as TorchServe's BaseHandler, so a handler written for one is easy to
move to the other; it loads TorchScript, eager (state_dict or safetensors) and
``torch.export`` models, picks the device from the context, applies the optimization
switches of model-config.yaml (``precision``, ``quantize``, ``compile``, ``channels_last``),
runs inference under ``torch.inference_mode`` (and autocast for fp16/bf16 on a GPU), and
records how long each stage took in ``context.stage_times``. ``tensor_metadata()`` declares
the Open Inference Protocol inputs and outputs (by default, those of model-config.yaml).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import orjson

from .errors import InvalidInput
from .loading import Optimizations, load_model, optimizations_from, optimize

__all__ = ["BaseHandler", "body_of"]

log = logging.getLogger("osprey.handler")


def body_of(row: dict) -> Any:
    """The payload of one request: its ``data`` or ``body`` field (form or raw body). A body
    sent as ``application/json`` that does not parse is a 400 naming why (the server hands it
    over as bytes, as TorchServe does, with ``json_error`` set: server.core.codecs.NotJSON),
    unless Python's ``json`` reads it (NaN and Infinity, which strict JSON has not): then the
    parsed object, so that the handler names the number it refuses."""
    if "data" in row:
        value = row["data"]
    elif "body" in row:
        value = row["body"]
    elif len(row) == 1:
        value = next(iter(row.values()))
    else:
        raise InvalidInput("request has no body")
    error = getattr(value, "json_error", None)
    if error:
        try:  # what Python's json takes beyond strict JSON (NaN, Infinity): the handler judges the numbers
            parsed = json.loads(bytes(value).decode("utf-8"))
            orjson.dumps(parsed)  # ... but no lone surrogates or integers beyond 64 bits (NaN passes as null)
            return parsed
        except (ValueError, RecursionError, TypeError, orjson.JSONEncodeError):
            raise InvalidInput(f"the body is sent as application/json but is not valid JSON: {error}") from None
    return value


class BaseHandler:
    #: True for handlers that take Open Inference Protocol tensors (name -> ndarray)
    accepts_tensors = False

    def __init__(self) -> None:
        self.model: Any = None
        self.device: Any = None
        self.context: Any = None
        self.optimizations = Optimizations()
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
        self.optimizations = optimizations_from(context.model_yaml_config)
        if self.optimizations.quantize and self.device.type != "cpu":
            log.warning("quantize: %s runs on the CPU; model %s ignores its GPU", self.optimizations.quantize,
                        getattr(context, "model_name", "?"))
            self.device = torch.device("cpu")
        self.model = load_model(props.get("model_dir"), model.get("serializedFile"),
                                model.get("modelFile"), self.device)
        self.model = optimize(self.model, self.optimizations, self.device)
        self.initialized = True

    # --- optimization switches ------------------------------------------------------
    def prepare(self, x: Any) -> Any:
        """A model input tensor on the model's device, dtype (bf16 on the CPU) and memory format."""
        import torch

        x = x.to(self.device)
        if x.is_floating_point() and self.optimizations.precision != "fp32" and self.device.type == "cpu":
            x = x.to(torch.bfloat16)
        if self.optimizations.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> Any:
        """Autocast for fp16/bf16 on a GPU (on the CPU the model itself is bf16)."""
        import torch

        precision = self.optimizations.precision
        if precision == "fp32" or self.device is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)

    def tensor_metadata(self) -> dict:
        """Open Inference Protocol inputs and outputs: ``{"inputs": [...], "outputs": [...]}``."""
        cfg = (self.context.model_yaml_config or {}) if self.context else {}
        return {"inputs": list(cfg.get("inputs") or []), "outputs": list(cfg.get("outputs") or [])}

    def describe_handle(self) -> Any:
        """What ``GET /models/{model}?customized=true`` shows as ``customizedMetadata`` (a dict;
        anything else shows as ``{}``), as TorchServe's ``BaseHandler.describe_handle``. Run by
        the model's instance, in a batch of its own."""
        return None

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
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise InvalidInput(f"request {i}: body is not a numeric array ({exc})") from None
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise InvalidInput(f"requests in one batch have different shapes: {sorted(shapes)}")
        return self.prepare(torch.stack(rows))

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode(), self.autocast():
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
