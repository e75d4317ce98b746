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

Bad input never fails the good requests of a batch: a request whose examples cannot be
read gets its own 400 and the rest of the batch runs without it. A model with a batch
limit (``handler.max_examples`` in model-config.yaml, or the upper bound of a ``torch.export``
program's dynamic batch dimension) takes at most that many examples per request (more is a
400 naming the limit) and a batch holding more runs in chunks of at most that many.

Inputs are checked finite (and within float32) before they reach the model, so an output
holding NaN -- or infinity, in an output not named in ``infinite_ok`` (a log-probability
may legitimately be -inf) -- is the model's fault (NaN weights after a diverged retrain,
an overflow inside it): the requests whose rows hold it get a 503 "model produced
non-finite output for ..." (a server fault that error-rate alerts see) instead of an
answer of nulls, and the handler logs a warning. Each output of the batch is checked once
(one reduction); rows are looked at only when that check fails.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from typing import Any

import numpy as np

from ..base import BaseHandler, body_of
from ..errors import InvalidInput, PredictionException

log = logging.getLogger("osprey.handlers")

__all__ = ["BuiltinHandler", "image_statistics", "payload_bytes", "parse_json", "numeric_tensor", "float_tensor", "oip_datatype", "exported_batch_limit",
           "read_json", "read_labels", "topk_labels", "tensor"]


def image_statistics(x: Any) -> dict[str, np.ndarray]:
    """Monitoring features of a batch of preprocessed images (N x C x H x W, or N x pixels):
    ``mean``, ``contrast`` (standard deviation) and, for several channels, ``channel_mean[c]``."""
    if hasattr(x, "detach"):
        x = x.detach()
        if x.dtype != _torch_float32():
            x = x.float()
        a = x.cpu().numpy()
    else:
        a = np.asarray(x, dtype=np.float32)
    n = len(a)
    chans = a.reshape(n, a.shape[1], -1) if a.ndim >= 3 else a.reshape(n, 1, -1)
    flat = chans.reshape(n, -1).astype(np.float64)  # sums of squares in float64: no cancellation to speak of
    m = flat.shape[1]
    mean = flat.sum(axis=1) / m
    var = np.einsum("ij,ij->i", flat, flat) / m - mean * mean
    out = {"mean": mean, "contrast": np.sqrt(np.maximum(var, 0.0))}
    if chans.shape[1] > 1:
        means = chans.mean(axis=2)
        out.update({f"channel_mean[{c}]": means[:, c] for c in range(chans.shape[1])})
    return out


def _torch_float32() -> Any:
    import torch

    return torch.float32


def tensor(name: str, datatype: str, shape: list[int]) -> dict:
    """One entry of ``tensor_metadata()``."""
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def parse_json(body: Any, what: str = "body", expect: str = "") -> Any:
    """``body`` (bytes or text) parsed as JSON; not JSON -- or nested too deeply to parse --
    is a 400 saying so (``expect`` adds what the body should look like)."""
    hint = f": {expect}" if expect else ""
    try:
        if isinstance(body, (bytes, bytearray, memoryview)):
            body = bytes(body).decode("utf-8")
        return json.loads(body)
    except RecursionError:
        raise InvalidInput(f"{what} is not valid JSON (nested too deeply){hint}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not valid JSON (not UTF-8 text){hint}") from None
    except ValueError:
        raise InvalidInput(f"{what} is not valid JSON{hint}") from None


_OIP_TYPES = {"b": "BOOL", "u1": "UINT8", "u2": "UINT16", "u4": "UINT32", "u8": "UINT64", "i1": "INT8",
              "i2": "INT16", "i4": "INT32", "i8": "INT64", "f2": "FP16", "f4": "FP32", "f8": "FP64"}


def oip_datatype(arr: np.ndarray) -> str:
    """The Open Inference Protocol datatype name of an array (BYTES for text and objects)."""
    kind = arr.dtype.kind
    if kind in "OSUV":
        return "BYTES"
    return _OIP_TYPES.get("b" if kind == "b" else f"{kind}{arr.dtype.itemsize}", str(arr.dtype))


def numeric_tensor(name: str, arr: Any, datatype: str = "FP32") -> np.ndarray:
    """``arr`` as an array if it holds numbers; BYTES (text, objects) is a 400 naming the
    datatype the model takes."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise InvalidInput(f"input '{name}' must be {datatype}, got {oip_datatype(arr)}")
    return arr


def float_tensor(name: str, arr: Any, datatype: str = "FP32", limit: float | None = None) -> np.ndarray:
    """A numeric input tensor as float32: BYTES (or other non-numbers) is a 400 naming the
    expected datatype, values that are NaN or infinite in float32 a 400 naming the input,
    and so are values beyond +-``limit`` where one is given."""
    arr = numeric_tensor(name, arr, datatype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32, copy=False)
    if limit is None:
        ok = np.isfinite(out).all()
    else:  # one pass: NaN makes the maximum NaN, and NaN <= limit is False
        ok = out.size == 0 or bool(np.abs(out).max() <= limit)
    if not ok:
        if not np.isfinite(out).all():
            raise InvalidInput(f"input '{name}' holds values that are not finite numbers in float32 (NaN, infinity "
                               f"or beyond +-3.4e38)")
        raise InvalidInput(f"input '{name}' holds values beyond +-{limit:g}, outside the range the model takes")
    return out


def exported_batch_limit(model: Any) -> int | None:
    """The largest batch a ``torch.export`` program takes: the upper bound of its inputs'
    dynamic first dimension (``Dim("batch", max=N)``), or None where there is none."""
    ranges = getattr(model, "range_constraints", None)
    graph = getattr(model, "graph", None)
    if not ranges or graph is None:
        return None
    bounds = {str(sym): vr for sym, vr in ranges.items()}
    limit = None
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        shape = getattr(node.meta.get("val"), "shape", None)
        if not shape:
            continue
        expr = getattr(getattr(shape[0], "node", None), "expr", None)
        vr = bounds.get(str(expr)) if expr is not None else None
        if vr is None:
            continue
        upper = getattr(vr, "upper", None)
        if not (isinstance(upper, int) or getattr(upper, "is_Integer", False)):  # unbounded: int_oo
            continue
        upper = int(upper)
        limit = upper if limit is None else min(limit, upper)
    return limit


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
                inner = value[key]
                if isinstance(inner, (dict, list)):  # one level only: a deeply nested body is no image
                    raise InvalidInput(f"JSON {what}: {key!r} must hold base64 text")
                return payload_bytes(inner, what, keys)
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
    #: what an example is called in messages ("records", "images", ...)
    example_noun = "examples"
    #: outputs that may legitimately hold +-infinity (log-probabilities); NaN never may
    infinite_ok: frozenset[str] = frozenset()

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        limit = self.config.get("max_examples")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"model-config.yaml handler.max_examples must be a positive integer, got {limit!r}")
            self.max_examples: int | None = limit
        else:
            self.max_examples = exported_batch_limit(self.model)

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
    def input_tensor(self, tensors: dict[str, np.ndarray], names: tuple[str, ...],
                     also: tuple[str, ...] = ()) -> tuple[str, np.ndarray]:
        """The one input tensor this handler takes, by one of ``names`` (the names its metadata
        gives; several are alternatives, e.g. an encoded image or the preprocessed tensor).
        ``also``: other inputs the caller reads itself. Any other input is refused by name, as
        is more than one of the alternatives: nothing a request sends is silently ignored."""
        extra = [n for n in tensors if n not in names and n not in also]
        takes = " or ".join(map(repr, names))
        if extra:
            raise InvalidInput(f"unknown input(s) {', '.join(map(repr, extra))}; this model takes {takes}"
                               + (f" (with {', '.join(map(repr, also))})" if also else ""))
        given = [n for n in names if n in tensors]
        if len(given) > 1:
            raise InvalidInput(f"inputs {' and '.join(map(repr, given))} are alternatives; send one of them")
        if not given:
            raise InvalidInput(f"expected an input tensor named {takes}, got {', '.join(map(repr, tensors)) or 'none'}")
        return given[0], np.asarray(tensors[given[0]])

    def _examples(self, row: Any) -> tuple[list, bool]:
        tensors = row.get("tensors") if isinstance(row, dict) else None
        if tensors is not None:
            got = self.examples_from_tensors(tensors)
        else:
            got = self.examples_from_body(body_of(row))
        if not got:
            raise InvalidInput("the request holds no examples")
        limit = getattr(self, "max_examples", None)
        if limit is not None and len(got) > limit:
            raise InvalidInput(f"at most {limit} {self.example_noun} per request (the model's batch limit), "
                               f"got {len(got)}")
        return got, tensors is not None

    def _reject(self, idx: int, exc: PredictionException) -> str:
        """Answer request ``idx`` of the batch with ``exc``'s status, alone; the batch goes on.
        Without per-request statuses (a bare context) the whole batch fails with it."""
        processors = getattr(self.context, "request_processor", None)
        if not processors or idx >= len(processors):
            raise exc
        self.context.set_response_status(exc.error_code, exc.message, idx)
        return exc.message

    def _run(self, examples: list) -> tuple[dict[str, np.ndarray], float, float]:
        """Collate and forward ``examples`` in chunks of at most ``max_examples``; the
        outputs joined, and the seconds spent collating and in the model."""
        limit = getattr(self, "max_examples", None) or len(examples)
        parts, prep, infer = [], 0.0, 0.0
        for start in range(0, len(examples), limit):
            t0 = time.perf_counter()
            batch = self.collate(examples[start:start + limit])
            t1 = time.perf_counter()
            parts.append(self.forward(batch))
            prep, infer = prep + t1 - t0, infer + time.perf_counter() - t1
        if len(parts) == 1:
            return parts[0], prep, infer
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, prep, infer

    def _faulty_rows(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Output name -> one flag per example: its row holds NaN (or an infinity the output
        may not hold). Empty when every output is fine -- the usual case, one sum per output:
        a finite sum means finite values; a sum that is not (NaN, infinity, or an overflow of
        large finite values) sends that output to the exact, element-wise check."""
        bad: dict[str, np.ndarray] = {}
        for name, v in outputs.items():
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.size == 0:
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                total = v.sum()
            if name in self.infinite_ok:
                if not np.isnan(total):
                    continue
                flags = np.isnan(v)
            else:
                if np.isfinite(total):
                    continue
                flags = ~np.isfinite(v)
            rows = flags.reshape(len(v), -1).any(axis=1)
            if rows.any():
                bad[name] = rows
        return bad

    # --- monitoring (handlers/monitoring.py) ------------------------------------------------
    @property
    def monitor_rows(self) -> np.ndarray | None:
        """The request (index in ``data``) of each example of the last batch, in model order;
        None when that is every request once, in order (most batches: nothing to compute)."""
        if getattr(self, "_one_each", False):  # one example per request, in order: the identity
            return None
        spans = getattr(self, "_spans", None) or {}
        n = len(spans)
        idx = np.fromiter(spans.keys(), np.int64, n)
        counts = np.fromiter((c for _, c, _ in spans.values()), np.int64, n)
        return np.repeat(idx, counts)

    # --- the pipeline -----------------------------------------------------------------
    def handle(self, data: list[dict], context: Any) -> list:
        self.context = context
        t0 = time.perf_counter()
        spans: dict[int, tuple[int, int, bool]] = {}  # idx -> (start, count, is_tensor_request)
        self._spans = spans
        results: list = [None] * len(data)
        examples: list = []
        one_each = True
        for idx, row in enumerate(data):
            try:
                got, is_tensors = self._examples(row)
            except PredictionException as exc:
                results[idx] = self._reject(idx, exc)
                one_each = False
                continue
            spans[idx] = (len(examples), len(got), is_tensors)
            one_each = one_each and len(got) == 1
            examples.extend(got)
        self._one_each = one_each
        t1 = time.perf_counter()
        outputs, prep, infer = self._run(examples) if examples else ({}, 0.0, 0.0)
        t2 = time.perf_counter()
        faulty = self._faulty_rows(outputs)
        if faulty:
            name, rows = next(iter(faulty.items()))
            log.warning("model %s produced non-finite output for %r in %d of %d %s (NaN weights?)",
                        getattr(context, "model_name", "?"), name, int(rows.sum()), len(rows), self.example_noun)
        for idx, (start, count, is_tensors) in spans.items():
            part = {k: v[start:start + count] for k, v in outputs.items()}
            bad = [k for k, rows in faulty.items() if rows[start:start + count].any()] if faulty else None
            if bad:
                results[idx] = self._reject(idx, PredictionException(
                    f"model produced non-finite output for {bad[0]!r} (NaN or infinity): the model is faulty "
                    "(NaN weights?) or overflowed on this input", 503))
            elif is_tensors:
                results[idx] = {"tensors": part}
            else:
                results[idx] = self.answer(part, examples[start:start + count], idx)
        t3 = time.perf_counter()
        times = getattr(context, "stage_times", None)
        if times is not None:
            times["preprocess"], times["inference"], times["postprocess"] = t1 - t0 + prep, infer, t3 - t2
        return results
