"""What every built-in handler shares: one forward pass per batch, REST and OIP inputs alike.

A request reaches a built-in handler either as a TorchServe-style body (bytes, str, or a
decoded JSON object) or, through the Open Inference Protocol, as named tensors
(``row["tensors"]``: name -> ndarray whose first dimension counts examples). Each request
is turned into a list of *examples*; all examples of the batch are collated into one model
input, run in one forward pass, and the outputs are split back: a body request gets the
handler's JSON (or image) answer, a tensor request gets ``{"tensors": {name: array}}``.

A subclass provides:

- ``examples_from_body(body)`` and ``examples_from_tensors(tensors)`` -> list of examples;
- ``collate(examples)`` -> the model input; ``forward(batch)`` -> dict name -> ndarray with
  one row per example;
- ``answer(outputs, examples, idx)`` -> the answer of body request ``idx`` of the batch,
  given its rows (it may set that request's response headers through ``self.context``);
- ``tensor_metadata()`` -> ``{"inputs": [...], "outputs": [...]}``, each
  ``{"name", "datatype", "shape"}`` with -1 for the batch and any variable dimension.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from typing import Any

import numpy as np

from ..base import BaseHandler, body_of
from ..errors import InvalidInput

__all__ = ["BuiltinHandler", "payload_bytes", "read_json", "read_labels", "topk_labels", "tensor"]


def tensor(name: str, datatype: str, shape: list[int]) -> dict:
    """One entry of ``tensor_metadata()``."""
    return {"name": name, "datatype": datatype, "shape": list(shape)}


_BASE64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n")


def payload_bytes(value: Any, what: str = "input", keys: tuple[str, ...] = ("data", "b64", "image")) -> bytes:
    """Raw bytes, base64 text (also as bytes: an OIP BYTES tensor sent as JSON), or a JSON
    object carrying base64 under one of ``keys``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if raw and len(raw) % 4 == 0 and _BASE64_CHARS.issuperset(raw[:4096]):
            try:
                return base64.b64decode(raw, validate=False)
            except (binascii.Error, ValueError):
                pass
        return raw
    if isinstance(value, dict):
        for key in keys:
            if key in value:
                return payload_bytes(value[key], what, keys)
        raise InvalidInput(f"JSON {what} needs one of the keys {', '.join(keys)} holding base64 data")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:  # a data: URL
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{what} text is not valid base64") from None
    raise InvalidInput(f"{what} must be bytes or base64 text, got {type(value).__name__}")


def read_json(model_dir: str, name: str, default: Any = None) -> Any:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_labels(model_dir: str, name: str = "index_to_name.json") -> dict[int, str] | None:
    """``index_to_name.json`` ({"0": "cat", ...} or ["cat", ...]) as index -> label."""
    raw = read_json(model_dir, name)
    if raw is None:
        return None
    if isinstance(raw, list):
        return {i: str(v) for i, v in enumerate(raw)}
    out = {}
    for k, v in raw.items():
        # TorchServe's ImageNet file maps to [wordnet id, name]; use the name.
        out[int(k)] = str(v[-1]) if isinstance(v, list) else str(v)
    return out


def topk_labels(probs: np.ndarray, labels: dict[int, str] | None, k: int) -> dict[str, float]:
    """``{label: probability}`` for the ``k`` most probable classes, most probable first."""
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, kind="stable")[:k]
    return {(labels.get(int(i), str(int(i))) if labels else str(int(i))): float(probs[i]) for i in order}


class BuiltinHandler(BaseHandler):
    """Batch-aware pipeline shared by the built-in handlers (see the module docstring)."""

    accepts_tensors = True

    # --- to be provided by subclasses ---------------------------------------------------
    def examples_from_body(self, body: Any) -> list:
        raise NotImplementedError

    def examples_from_tensors(self, tensors: dict[str, np.ndarray]) -> list:
        raise NotImplementedError

    def collate(self, examples: list) -> Any:
        raise NotImplementedError

    def forward(self, batch: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def answer(self, outputs: dict[str, np.ndarray], examples: list, idx: int) -> Any:
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------
    def input_tensor(self, tensors: dict[str, np.ndarray], names: tuple[str, ...]) -> tuple[str, np.ndarray]:
        """The one input tensor this handler takes, by one of ``names`` (or the only one)."""
        for name in names:
            if name in tensors:
                return name, np.asarray(tensors[name])
        if len(tensors) == 1:
            name, value = next(iter(tensors.items()))
            return name, np.asarray(value)
        raise InvalidInput(f"expected an input tensor named {' or '.join(names)}, got {', '.join(tensors) or 'none'}")

    # --- the pipeline -----------------------------------------------------------------
    def handle(self, data: list[dict], context: Any) -> list:
        self.context = context
        t0 = time.perf_counter()
        spans: list[tuple[int, int, bool]] = []  # (start, count, is_tensor_request)
        examples: list = []
        for row in data:
            tensors = row.get("tensors") if isinstance(row, dict) else None
            if tensors is not None:
                got = self.examples_from_tensors(tensors)
            else:
                got = self.examples_from_body(body_of(row))
            if not got:
                raise InvalidInput("the request holds no examples")
            spans.append((len(examples), len(got), tensors is not None))
            examples.extend(got)
        batch = self.collate(examples)
        t1 = time.perf_counter()
        outputs = self.forward(batch)
        t2 = time.perf_counter()
        results = []
        for idx, (start, count, is_tensors) in enumerate(spans):
            part = {k: v[start:start + count] for k, v in outputs.items()}
            if is_tensors:
                results.append({"tensors": part})
            else:
                results.append(self.answer(part, examples[start:start + count], idx))
        t3 = time.perf_counter()
        times = getattr(context, "stage_times", None)
        if times is not None:
            times["preprocess"], times["inference"], times["postprocess"] = t1 - t0, t2 - t1, t3 - t2
        return results
