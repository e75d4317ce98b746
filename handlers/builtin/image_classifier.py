"""``image_classifier``: image bytes (or base64) -> top-k ``{label: probability}``.

Pillow and torch only. Settings come from the ``handler:`` section of model-config.yaml::

    handler:
      mode: RGB            # Pillow mode the image is converted to: RGB or L (grayscale)
      resize: 256          # shorter side, or [height, width]
      resample: bilinear   # nearest | box | bilinear | bicubic | lanczos
      crop: 224            # center crop: side, or [height, width]
      scale: 255           # pixel values are divided by this
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
      invert: false        # 1 - x after scaling (dark ink on white paper)
      topk: 5
      pixel_limit: 1000000 # preprocessed pixel tensors (OIP ``input``) must lie within +-this

Labels come from ``index_to_name.json``. Open Inference Protocol: input ``image`` (BYTES,
one encoded image per element) or ``input`` (FP32 pixels, already preprocessed: N x the
transform's output shape, finite values within +-``pixel_limit`` -- anything else is a 400
naming the expected shape or the range), output ``probabilities`` (FP32, one row of class
probabilities per image).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import InvalidInput
from .common import BuiltinHandler, float_tensor, image_statistics, payload_bytes, read_labels, tensor, topk_labels

__all__ = ["ImageClassifier", "ImageTransform"]

_RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


def _pair(value: Any, key: str) -> tuple[int, int] | int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"model-config.yaml handler.{key} must be a positive integer or [height, width], got {value!r}")


class ImageTransform:
    """Decode, convert, resize, center-crop and normalize one image into a CHW float array."""

    def __init__(self, cfg: dict):
        from PIL import Image

        self.mode = str(cfg.get("mode", "RGB"))
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"model-config.yaml handler.mode must be RGB or L, got {self.mode!r}")
        self.resize = _pair(cfg.get("resize"), "resize")
        self.crop = _pair(cfg.get("crop"), "crop")
        resample = str(cfg.get("resample", "bilinear")).lower()
        if resample not in _RESAMPLE:
            raise ValueError(f"model-config.yaml handler.resample must be one of {', '.join(_RESAMPLE)}")
        self.resample = getattr(Image.Resampling, resample.upper())
        self.scale = float(cfg.get("scale", 255.0))
        channels = 1 if self.mode == "L" else 3
        mean = cfg.get("mean", [0.0] * channels)
        std = cfg.get("std", [1.0] * channels)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        if self.mean.shape[0] not in (1, channels) or self.std.shape[0] not in (1, channels):
            raise ValueError(f"model-config.yaml handler.mean/std need 1 or {channels} values for mode {self.mode}")
        if np.any(self.std == 0):
            raise ValueError("model-config.yaml handler.std must not contain 0")
        self.invert = bool(cfg.get("invert", False))
        self.channels = channels

    def output_shape(self) -> list[int]:
        size = self.crop or self.resize
        if isinstance(size, tuple):
            return [self.channels, size[0], size[1]]
        return [self.channels, -1, -1]

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except UnidentifiedImageError:
            raise InvalidInput("input is not an image in a format Pillow reads (PNG, JPEG, ...)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInput(f"input is not a readable image ({exc})") from None
        except Image.DecompressionBombError as exc:
            raise InvalidInput(f"image is too large ({exc})") from None
        img = img.convert(self.mode)
        if self.resize is not None:
            if isinstance(self.resize, tuple):
                size = (self.resize[1], self.resize[0])
            else:  # shorter side
                w, h = img.size
                s = self.resize / min(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
            img = img.resize(size, self.resample)
        if self.crop is not None:
            ch, cw = self.crop if isinstance(self.crop, tuple) else (self.crop, self.crop)
            w, h = img.size
            if cw > w or ch > h:
                raise InvalidInput(f"image of {w}x{h} is smaller than the {cw}x{ch} crop")
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        arr = arr / self.scale
        if self.invert:
            arr = 1.0 - arr
        return (arr - self.mean) / self.std


class ImageClassifier(BuiltinHandler):
    """Top-k image classification, batch-aware (one forward pass per batch)."""

    example_noun = "images"

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        self.transform = ImageTransform(self.config)
        self.labels = read_labels(context.system_properties["model_dir"])
        self.topk = int(self.config.get("topk", 5))
        limit = self.config.get("pixel_limit", 1e6)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < float("inf"):
            raise ValueError(f"model-config.yaml handler.pixel_limit must be a positive number, got {limit!r}")
        self.pixel_limit = float(limit)

    def tensor_metadata(self) -> dict:
        n = len(self.labels) if self.labels else -1
        return {"inputs": [tensor("image", "BYTES", [-1]), tensor("input", "FP32", [-1, *self.transform.output_shape()])],
                "outputs": [tensor("probabilities", "FP32", [-1, n])]}

    def examples_from_body(self, body: Any) -> list:
        return [self.transform(payload_bytes(body, "image"))]

    def examples_from_tensors(self, tensors: dict) -> list:
        name, arr = self.input_tensor(tensors, ("image", "input"))
        if arr.dtype.kind in "OSUV":  # encoded images
            return [self.transform(payload_bytes(v if not isinstance(v, np.ndarray) else v.tobytes(), "image"))
                    for v in arr.reshape(-1)]
        # preprocessed pixels: N x the transform's output shape (-1: any size)
        want = self.transform.output_shape()
        if arr.ndim == len(want):
            arr = arr[None]
        if arr.ndim != len(want) + 1 or any(w != -1 and w != d for w, d in zip(want, arr.shape[1:])):
            shown = ", ".join("H" if i == 1 and w == -1 else "W" if w == -1 else str(w) for i, w in enumerate(want))
            raise InvalidInput(f"input '{name}' must be FP32 of shape [N, {shown}], got {list(arr.shape)}")
        return list(float_tensor(name, arr, limit=self.pixel_limit))

    def collate(self, examples: list) -> Any:
        import torch

        shapes = {e.shape for e in examples}
        if len(shapes) > 1:
            raise InvalidInput(f"images have different sizes after preprocessing {sorted(shapes)}; "
                               "set handler.resize and handler.crop in model-config.yaml")
        return self.prepare(torch.from_numpy(np.stack(examples)))

    def forward(self, batch: Any) -> dict:
        import torch

        logits = self.inference(batch)
        probs = torch.softmax(logits.float(), dim=-1)
        return {"probabilities": probs.cpu().numpy()}

    # --- monitoring (handlers/monitoring.py): logits -> softmax, embedding from the penultimate layer
    monitor_task = "classification"
    monitor_logits = True

    def monitor_features(self, inputs: Any, outputs: Any) -> dict:
        """``mean``, ``contrast`` and per-channel means of the preprocessed tensor."""
        return image_statistics(inputs)

    def answer(self, outputs: dict, examples: list, idx: int) -> Any:
        return topk_labels(outputs["probabilities"][0], self.labels, self.topk)
