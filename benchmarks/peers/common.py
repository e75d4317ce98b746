"""What every peer's server file shares: the benchmark's models and their pre/post-processing.

Runs inside a peer's own virtual environment (torch, numpy, Pillow only; no Osprey imports).
The spec comes from ``benchmarks/peerspec.py`` as JSON: per model its TorchScript file, kind
(mlp | cnn | digits), one sample's shape, the batching of its archive (``batch_size``,
``delay_ms``) and, for digits, the archive's labels and ``handler:`` preprocessing settings.
The code below is the archives' handler code (``benchmarks/models.py``: ``MLP_HANDLER``,
``CNN_HANDLER``, ``DIGITS_HANDLER``) with the per-request parsing split off, so that every
peer does the same work per batch as Osprey and TorchServe do.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

__all__ = ["Model", "load_spec"]


class Model:
    """One model: ``run(rows)`` takes a batch of already-parsed rows, returns one answer per row.

    Rows: mlp, a list of 16 floats; cnn, the raw float32 body (bytes); digits, the PNG (bytes, or a
    Pillow image where the peer opened it).
    """

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.kind = spec["kind"]
        self.shape = tuple(spec.get("shape") or ())
        self.batch_size = int(spec.get("batch_size") or 1)
        self.delay_ms = float(spec.get("delay_ms") or 0)
        self.model = torch.jit.load(spec["weights"]).eval()
        self.labels = spec.get("labels") or {}
        self.cfg = spec.get("preprocess") or {}

    def run(self, rows: list) -> list:
        with torch.inference_mode():
            if self.kind == "mlp":
                return self.model(torch.tensor(rows, dtype=torch.float32)).tolist()
            if self.kind == "cnn":
                x = torch.from_numpy(np.stack([np.frombuffer(r, dtype=np.float32) for r in rows]))
                return [{"class": c} for c in self.model(x.reshape(len(rows), *self.shape)).argmax(1).tolist()]
            return self._digits(rows)

    def _digits(self, rows: list[bytes]) -> list[dict]:
        cfg = self.cfg
        h, w = cfg.get("resize", [8, 8])
        resample = getattr(Image.Resampling, str(cfg.get("resample", "box")).upper())
        mean = np.asarray(cfg.get("mean", [0.0]), dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(cfg.get("std", [1.0]), dtype=np.float32).reshape(-1, 1, 1)
        xs = []
        for png in rows:  # the PNG's bytes, or (BentoML) the image it already opened with Pillow
            img = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
            img = img.convert(cfg.get("mode", "L")).resize((w, h), resample)
            arr = np.asarray(img, dtype=np.float32)
            arr = (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)) / float(cfg.get("scale", 255.0))
            xs.append((arr - mean) / std)
        probs = torch.softmax(self.model(torch.from_numpy(np.stack(xs))), dim=1)
        top_p, top_i = probs.topk(int(cfg.get("topk", 5)), dim=1)
        return [{self.labels.get(str(i), str(i)): p for p, i in zip(ps, ids)}
                for ps, ids in zip(top_p.tolist(), top_i.tolist())]

    def parse(self, body: bytes):
        """One request's raw body as the benchmark sends it to Osprey -> one row."""
        return json.loads(body) if self.kind == "mlp" else body


def load_spec(text_or_path: str) -> dict[str, dict]:
    """The spec JSON, given inline or as a file path."""
    text = text_or_path
    if not text.lstrip().startswith("{"):
        with open(text_or_path) as fh:
            text = fh.read()
    return json.loads(text)
