"""How values cross between the wire and a handler, protocol-neutral.

TorchServe's decoding of a field for a handler (:func:`decode_field`), its encoding of a
handler's answer (:func:`encode_body`), and protocol tensors turned into fields for a
handler that only knows bytes (:func:`fields_from_tensors`). Used by instances (in any
process) and by the protocol adapters; knows no HTTP, protobuf or torch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from server.core.types import Field

__all__ = ["decode_field", "encode_body", "fields_from_tensors", "NotJSON"]


class NotJSON(bytearray):
    """A field sent as ``application/json`` that does not parse, for a handler built on Osprey's
    ``handlers.base.BaseHandler`` (the built-in ones): ``json_error`` says why, so that it
    answers 400 naming it instead of reading the text as text or bytes. Any other handler gets
    a plain bytearray, as TorchServe hands it ("Forwarding encoded payload")."""

    json_error: str = ""


def decode_field(f: Field, mark_json: bool = False) -> Any:
    """TorchServe's decoding: JSON -> object, text/* -> str, anything else -> bytearray. JSON
    that does not parse is a bytearray, as there; with ``mark_json`` (Osprey's own handlers,
    which answer 400 for it) a :class:`NotJSON` saying why."""
    ct = f.content_type.split(";", 1)[0].strip().lower()
    if ct == "application/json":
        try:
            return orjson.loads(f.value)
        except orjson.JSONDecodeError as exc:
            if not mark_json:
                return bytearray(f.value)
            raw = NotJSON(f.value)
            why = str(exc)
            raw.json_error = ("the body is empty" if not raw.strip() else
                              f"nested too deeply ({why})" if why.startswith("depth limit") else why)
            return raw
    if ct.startswith("text/"):
        try:
            return bytes(f.value).decode("utf-8")
        except UnicodeDecodeError:
            return bytearray(f.value)
    return bytearray(f.value)


def _to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def encode_body(value: Any) -> tuple[bytes, str]:
    """bytes are sent raw, str as UTF-8, anything else as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    try:
        return orjson.dumps(value, default=_to_jsonable,
                            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS), "application/json"
    except TypeError:
        return json.dumps(value, default=_to_jsonable).encode(), "application/json"


def fields_from_tensors(tensors: dict[str, np.ndarray], meta: dict | None = None) -> dict[str, Field]:
    """Protocol tensors for a handler that only knows bytes (TorchServe style).

    A single input becomes the ``body`` field, several become one field each. A BYTES
    tensor of one element is its bytes (content type from the input's ``content_type``
    parameter, if any); anything else is the JSON of the (nested) array.
    """
    fields = {}
    single = len(tensors) == 1
    for name, arr in tensors.items():
        ctype = ((meta or {}).get(name) or {}).get("content_type", "")
        if arr.dtype == object and arr.size == 1:
            value = arr.reshape(-1)[0]
            fields["body" if single else name] = Field(value, ctype)
            continue
        if arr.dtype == object:
            data = [v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else v for v in arr.ravel()]
            fields["body" if single else name] = Field(orjson.dumps(data), "application/json")
        else:
            try:
                data = orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)
            except TypeError:  # float16, non-contiguous: orjson serializes only plain arrays
                data = orjson.dumps(arr.tolist())
            fields["body" if single else name] = Field(data, "application/json")
    return fields
