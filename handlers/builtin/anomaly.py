"""``anomaly``: an autoencoder's reconstruction error, and ``is_anomaly`` against a threshold.

The threshold was computed when the model was packaged (e.g. the 99th percentile of the
training data's reconstruction errors) and is stored in model-config.yaml::

    handler:
      threshold: 0.0123       # required
      input_shape: [64]       # one example, as the model takes it
      mean: 0.0               # x_model = (x - mean) / scale: a number or one per feature
      scale: 16.0
      image: {mode: L, resize: [8, 8], resample: box, scale: 16}   # optional: also take images

The reconstruction error is the mean squared difference between the model's input and
output (in model units). A body is a JSON array of numbers (any nesting, ``input_shape``
values in all), ``{"data": [...]}``, a list of such arrays (answered with a list), or -- with
``image`` configured -- image bytes or base64. The answer is
``{"reconstruction_error", "is_anomaly", "threshold"}``. Open Inference Protocol: input
``input`` (FP32, N x input_shape), outputs ``reconstruction_error`` (FP32, N) and
``is_anomaly`` (BOOL, N).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidInput
from .common import BuiltinHandler, image_statistics, numeric_tensor, parse_json, payload_bytes, tensor

__all__ = ["AnomalyHandler"]


class AnomalyHandler(BuiltinHandler):
    def initialize(self, context: Any) -> None:
        super().initialize(context)
        cfg = self.config
        if "threshold" not in cfg:
            raise ValueError("model-config.yaml handler.threshold is required for the anomaly handler "
                             "(compute it from training data when packaging)")
        self.threshold = float(cfg["threshold"])
        self.input_shape = tuple(int(d) for d in cfg.get("input_shape", [-1]))
        self.size = int(np.prod(self.input_shape)) if all(d > 0 for d in self.input_shape) else None
        self.mean = np.asarray(cfg.get("mean", 0.0), dtype=np.float32)
        self.scale = np.asarray(cfg.get("scale", 1.0), dtype=np.float32)
        self.image = None
        if cfg.get("image"):
            from .image_classifier import ImageTransform

            self.image = ImageTransform(dict(cfg["image"]))

    def tensor_metadata(self) -> dict:
        return {"inputs": [tensor("input", "FP32", [-1, *self.input_shape])],
                "outputs": [tensor("reconstruction_error", "FP32", [-1]), tensor("is_anomaly", "BOOL", [-1])]}

    def _example(self, values: Any) -> np.ndarray:
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                x = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError, RecursionError):
            raise InvalidInput("input must be an array of numbers") from None
        if self.size is not None and x.size != self.size:
            raise InvalidInput(f"input must hold {self.size} numbers (shape {list(self.input_shape)}), got {x.size}")
        if not np.all(np.isfinite(x)):
            raise InvalidInput("input must hold finite numbers only (within float32's range, about +-3.4e38)")
        return x.reshape(self.input_shape) if self.size is not None else x

    def examples_from_body(self, body: Any) -> list:
        if isinstance(body, dict):
            for key in ("data", "input", "instances"):
                if key in body:
                    body = body[key]
                    break
            else:
                raise InvalidInput("JSON input needs a data key holding the numbers")
        if isinstance(body, (bytes, bytearray, str)):
            raw = bytes(body) if not isinstance(body, str) else body.encode()
            stripped = raw.lstrip()
            if stripped[:1] == b"[":
                body = parse_json(raw, expect="an array of numbers")
            elif self.image is not None:
                pixels = self.image(payload_bytes(body, "image"))
                return [(self._example(pixels), False)]
            else:
                raise InvalidInput("input must be a JSON array of numbers")
        if self._many(body):
            return [(self._example(r), True) for r in body]
        return [(self._example(body), False)]

    def _many(self, body: Any) -> bool:
        """A list of whole examples (each ``input_shape`` values), not one nested example."""
        if self.size is None or not isinstance(body, list) or not body or not all(isinstance(r, list) for r in body):
            return False
        try:
            return all(np.asarray(r, dtype=np.float32).size == self.size for r in body)
        except (TypeError, ValueError, RecursionError):
            return False

    def examples_from_tensors(self, tensors: dict) -> list:
        name, arr = self.input_tensor(tensors, ("input",))
        with np.errstate(over="ignore", invalid="ignore"):
            arr = numeric_tensor(name, arr).astype(np.float32, copy=False)
        if self.size is not None:
            if arr.size % self.size:
                raise InvalidInput(f"input must be N x {list(self.input_shape)}, got {list(arr.shape)}")
            arr = arr.reshape(-1, self.size)
        return [(self._example(r), True) for r in arr]

    def collate(self, examples: list) -> Any:
        import torch

        x = (np.stack([e for e, _ in examples]) - self.mean) / self.scale
        return self.prepare(torch.from_numpy(x.astype(np.float32)))

    def forward(self, batch: Any) -> dict:
        recon = self.inference(batch).float()
        x = batch.float()
        err = ((recon.reshape(len(x), -1) - x.reshape(len(x), -1)) ** 2).mean(dim=1).cpu().numpy()
        return {"reconstruction_error": err, "is_anomaly": err > self.threshold}

    # --- monitoring (handlers/monitoring.py) ------------------------------------------------
    monitor_task = "autoencoder"

    def monitor_features(self, inputs: Any, outputs: Any) -> dict:
        """The input's ``mean`` and ``contrast`` (model units) and the ``reconstruction_error``."""
        x = inputs.detach().float()
        recon = outputs.detach().float()
        err = ((recon.reshape(len(x), -1) - x.reshape(len(x), -1)) ** 2).mean(dim=1)
        stats = image_statistics(x.reshape(len(x), -1))
        return {"mean": stats["mean"], "contrast": stats["contrast"], "reconstruction_error": err}

    def answer(self, outputs: dict, examples: list, idx: int) -> Any:
        answers = [{"reconstruction_error": float(e), "is_anomaly": bool(a), "threshold": self.threshold}
                   for e, a in zip(outputs["reconstruction_error"], outputs["is_anomaly"])]
        return answers if examples[0][1] else answers[0]
