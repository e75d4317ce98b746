"""Request envelopes: TorchServe's ``service_envelope`` wrappers of a handler's entry point.

With ``service_envelope`` set (config.properties), every TorchServe-style handler's
``handle(data, context)`` is wrapped, as TorchServe's model loader does: the envelope takes
each request out of its wire shape, calls the handler with the items, and puts the handler's
answers back into the shape the client expects.

- ``body``: the handler gets each request's body (``data`` or ``body`` field), nothing else.
- ``json``: each body is ``{"instances": [...]}`` (TensorFlow Serving's REST shape); the
  handler gets the instances of the whole batch, ``{"b64": ...}`` values decoded to bytes, and
  each request gets ``{"predictions": [...]}`` (as a JSON text) with its share of the answers.
- ``kserve``: KServe v1: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out (or
  ``{"explanations": [...]}`` on an explain call).
- ``kservev2``: KServe v2 (Open Inference Protocol) JSON: the handler gets the ``inputs``
  (``name``, ``shape``, ``datatype``, ``data`` reshaped to ``shape``; a BYTES input's first
  element), and its i-th answer becomes output i, named after input i, with the datatype of
  its values (``INT64`` for integers, ``FP32`` for a float32 tensor, ``BOOL``, ``BYTES`` for
  text) and, as TorchServe answers, flattened (``shape`` is the element count).

Under batching: TorchServe's ``kserve`` and ``kservev2`` envelopes read only the first request
of a batch (the others get no answer of their own); here each request of a batch is
unwrapped, handled and wrapped on its own, with the context narrowed to that request (index 0
is that request's id, headers and response status), so every request gets its own answer.
``body`` hands the handler the batch as it is (item i is request i) and ``json`` the instances
of all requests together, as TorchServe's do.

A body the envelope cannot read (not JSON, no ``instances`` / ``inputs``, an input whose data
does not fit its shape) is answered 400 naming what is wrong, before the handler runs (where
TorchServe's handler fails on it with 503). Handlers that take tensors themselves
(``accepts_tensors``) are never wrapped.
"""

from __future__ import annotations

import json
from base64 import b64decode
from binascii import Error as Base64Error
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import InvalidInput

__all__ = ["ENVELOPES", "ALIASES", "envelope_names", "canonical_envelope", "wrap_handle"]

Handle = Callable[[Any, Any], Any]


def _body(row: Any) -> Any:
    """A request's payload, as TorchServe's envelopes take it: the ``data`` field, else ``body``."""
    if not isinstance(row, dict):
        return row
    return row.get("data") or row.get("body")


def _json_body(row: Any, what: str) -> dict:
    """A request's payload as a JSON object (bytes and text are parsed), or 400 saying why not."""
    return _json_object(_body(row), what)


def _json_object(body: Any, what: str) -> dict:
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError as exc:
            raise InvalidInput(f"{what} request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"{what} request body must be a JSON object, got {type(body).__name__}")
    return body


def _list_field(body: dict, key: str, what: str) -> list:
    value = body.get(key)
    if value is None:
        raise InvalidInput(f"{what} request body has no '{key}' list")
    if not isinstance(value, list):
        raise InvalidInput(f"{what} request body: '{key}' must be a list, got {type(value).__name__}")
    return value


@contextmanager
def _narrowed(context: Any, index: int) -> Iterator[None]:
    """The context as if request ``index`` were the whole batch (index 0), then as it was."""
    ids, processors, writers = context.request_ids, context.request_processor, context.stream_writers
    metrics = getattr(context, "metrics", None)
    tracks = hasattr(metrics, "request_ids")  # HandlerMetrics tags metrics with the batch's request ids
    metric_ids = metrics.request_ids if tracks else None
    context.request_ids = {0: ids[index]} if ids and index in ids else {}
    context.request_processor = [processors[index]] if processors else processors
    context.stream_writers = {0: writers[index]} if writers and index in writers else {}
    if tracks:
        metrics.request_ids = context.request_ids
    try:
        yield
    finally:
        context.request_ids, context.request_processor, context.stream_writers = ids, processors, writers
        if tracks:
            metrics.request_ids = metric_ids


class _PerRequest:
    """An envelope that handles each request of a batch on its own (kserve, kservev2)."""

    what = ""

    def __init__(self, handle: Handle):
        self.handle = handle

    def __call__(self, data: Any, context: Any) -> Any:
        if data is None:  # TorchServe's initialization call of a module-level handle
            return self.handle(data, context)
        if not isinstance(data, list):
            return self.handle(data, context)
        parsed = [self.unwrap(row) for row in data]  # all read first: a bad one fails before any runs
        out = []
        for i, items in enumerate(parsed):
            with _narrowed(context, i):
                results = self.handle(items, context)
                out.append(self.wrap(results, items, context))
        return out

    def unwrap(self, row: Any) -> Any:
        raise NotImplementedError

    def wrap(self, results: Any, items: Any, context: Any) -> Any:
        raise NotImplementedError


def _is_explain(context: Any) -> bool:
    return context.get_request_header(0, "explain") == "True"


class KServeEnvelope(_PerRequest):
    """KServe v1: ``{"instances": [...]}`` -> handler -> ``{"predictions": [...]}``."""

    what = "KServe v1"

    def unwrap(self, row: Any) -> Any:
        return _list_field(_json_body(row, self.what), "instances", self.what)

    def wrap(self, results: Any, items: Any, context: Any) -> Any:
        if results is None:
            raise ValueError("the handler returned None")
        return {"explanations" if _is_explain(context) else "predictions": results}


class KServeV2Envelope(_PerRequest):
    """KServe v2 JSON: ``{"inputs": [...]}`` -> handler -> ``{"id", "model_name", "model_version", "outputs"}``."""

    what = "KServe v2"

    def unwrap(self, row: Any) -> Any:
        body = _json_body(row, self.what)
        inputs = _list_field(body, "inputs", self.what)
        if not inputs:
            raise InvalidInput(f"{self.what} request body: 'inputs' is empty")
        items = [_v2_input(i, item) for i, item in enumerate(inputs)]
        rid = body.get("id")
        return _V2Items(items, rid if isinstance(rid, str) and rid.strip() else None)

    def wrap(self, results: Any, items: Any, context: Any) -> Any:
        if not isinstance(results, (list, tuple)):
            raise ValueError(f"the handler returned a {type(results).__name__}, not a list of outputs")
        if len(results) > len(items):
            raise ValueError(f"the handler returned {len(results)} outputs for {len(items)} inputs "
                             "(output i is named after input i)")
        model = (getattr(context, "manifest", None) or {}).get("model") or {}
        return {"id": items.request_id or context.get_request_id(0),
                "model_name": model.get("modelName", getattr(context, "model_name", "")),
                "model_version": model.get("modelVersion"),
                "outputs": [_v2_output(items[i]["name"], value) for i, value in enumerate(results)]}


class _V2Items(list):
    """The inputs handed to the handler (a plain list to it), with the request's ``id``."""

    def __init__(self, items: list, request_id: str | None):
        super().__init__(items)
        self.request_id = request_id


def _v2_input(i: int, item: Any) -> dict:
    import numpy as np

    if not isinstance(item, dict):
        raise InvalidInput(f"KServe v2 request body: inputs[{i}] must be an object, got {type(item).__name__}")
    for key in ("name", "datatype", "shape", "data"):
        if key not in item:
            raise InvalidInput(f"KServe v2 request body: inputs[{i}] has no '{key}'")
    name, shape, data = item["name"], item["shape"], item["data"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"KServe v2 input '{name}': 'shape' must be a list of integers, got {shape!r:.60}")
    out = dict(item)
    if item["datatype"] == "BYTES":  # TorchServe hands over a BYTES input's first element
        if not isinstance(data, list) or not data:
            raise InvalidInput(f"KServe v2 input '{name}': BYTES 'data' must be a non-empty list")
        out["data"] = data[0]
        return out
    try:
        out["data"] = np.array(data).reshape(tuple(shape)).tolist()
    except ValueError as exc:
        raise InvalidInput(f"KServe v2 input '{name}': 'data' does not fit shape {shape} ({exc})") from None
    return out


# numpy dtype (name, or kind for strings) -> KServe v2 datatype
_DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
              "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
              "float32": "FP32", "float64": "FP64", "object": "BYTES", "U": "BYTES", "S": "BYTES"}


def _v2_output(name: str, value: Any) -> dict:
    """One output tensor: its values flattened, with the datatype they really have."""
    import numpy as np

    datatype = None
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # a torch tensor (any device)
        import torch

        if value.dtype == torch.bfloat16:
            value, datatype = value.detach().float(), "BF16"
        value = value.detach().cpu().numpy()
    arr = np.asarray(value).reshape(-1)
    if datatype is None:
        datatype = _DATATYPES.get(str(arr.dtype)) or _DATATYPES.get(arr.dtype.kind)
    if datatype is None:
        raise ValueError(f"output '{name}' has values of type {arr.dtype}, which KServe v2 has no datatype for")
    if arr.dtype.kind == "S":
        data = [v.decode("utf-8", "replace") for v in arr.tolist()]
    else:
        data = arr.tolist()
    return {"name": name, "datatype": datatype, "data": data, "shape": [int(arr.shape[0])]}


class JSONEnvelope:
    """``{"instances": [...]}`` per request; the handler gets the instances of the whole batch."""

    what = "JSON envelope"

    def __init__(self, handle: Handle):
        self.handle = handle

    def __call__(self, data: Any, context: Any) -> Any:
        if not data or not isinstance(data, list):
            return self.handle(data, context)
        per_request = [self._instances(row) for row in data]
        batch = [item for items in per_request for item in items]
        results = self.handle(batch, context)
        if not isinstance(results, (list, tuple)) or len(results) != len(batch):
            size = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
            raise ValueError(f"the handler returned {size} answers for {len(batch)} instances")
        out, start = [], 0
        for items in per_request:
            out.append(json.dumps({"predictions": list(results[start:start + len(items)])}))
            start += len(items)
        return out

    def _instances(self, row: Any) -> list:
        body = _json_object(_body(row) or row, self.what)  # TorchServe's: data, else body, else the row
        instances = _list_field(body, "instances", self.what)
        return [_b64_decoded(item) for item in instances]


def _b64_decoded(item: Any) -> Any:
    """``{"b64": s}`` -> bytes, and each ``{"b64": s}`` value of an object likewise."""
    if not isinstance(item, dict):
        return item
    try:
        if list(item) == ["b64"]:
            return b64decode(item["b64"], validate=True)
        return {k: b64decode(v["b64"], validate=True) if isinstance(v, dict) and list(v) == ["b64"] else v
                for k, v in item.items()}
    except (Base64Error, TypeError, ValueError) as exc:
        raise InvalidInput(f"JSON envelope: a 'b64' value is not base64: {exc}") from None


class BodyEnvelope:
    """The handler gets each request's body (its ``data`` or ``body`` field) and nothing else."""

    def __init__(self, handle: Handle):
        self.handle = handle

    def __call__(self, data: Any, context: Any) -> Any:
        if data is None or not isinstance(data, list):
            return self.handle(data, context)
        return self.handle([_body(row) for row in data], context)


ENVELOPES: dict[str, Callable[[Handle], Handle]] = {
    "body": BodyEnvelope, "json": JSONEnvelope, "kserve": KServeEnvelope, "kservev2": KServeV2Envelope}
# TorchServe's earlier names (kfserving became KServe)
ALIASES = {"kfserving": "kserve", "kfservingv2": "kservev2"}


def envelope_names() -> list[str]:
    return sorted(ENVELOPES) + sorted(ALIASES)


def canonical_envelope(name: str) -> str:
    """``name`` as one of :data:`ENVELOPES` ('' for none); ValueError naming the choices."""
    name = (name or "").strip().lower()
    name = ALIASES.get(name, name)
    if name and name not in ENVELOPES:
        raise ValueError(f"setting service_envelope: {name!r} must be one of {', '.join(envelope_names())} "
                         "(or empty for none)")
    return name


def wrap_handle(handle: Handle, envelope: str | None) -> Handle:
    """``handle`` wrapped in the named envelope (none: ``handle`` itself)."""
    name = canonical_envelope(envelope or "")
    return ENVELOPES[name](handle) if name else handle
