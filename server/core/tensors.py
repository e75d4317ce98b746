"""Open Inference Protocol tensors <-> numpy, without copying tensor bytes.

Fixed-size datatypes are decoded with ``np.frombuffer`` (a view of the request's bytes);
BYTES tensors use the protocol's framing (4-byte little-endian length, then the bytes)
and become object arrays of ``bytes``. numpy has no bfloat16, so BF16 inputs arrive as
float32 arrays (exactly representable) and float32 outputs declared BF16 are rounded to
nearest-even. A shape that does not match the data, has more dimensions than numpy
allows, or values out of the datatype's range are a 400 naming the input.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any, Iterable

import numpy as np

from server.core.errors import ErrorKind, OspreyError

__all__ = ["DTYPES", "decode_raw", "decode_json", "decode_bytes", "encode_bytes", "encode_raw",
           "to_json_data", "datatype_of", "as_array", "element_count", "bad_input", "MAX_DIMS"]

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # wire format; decoded to float32
}

# A JSON float beyond FP16/FP32 becomes inf, as IEEE casts do; numpy's warning about it is
# noise (filtered once here: an np.errstate around every decode cost 2 us a request).
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning,
                        module=__name__)
_BY_DTYPE = {v: k for k, v in DTYPES.items() if k != "BF16"}
_FLOATS = frozenset(("FP16", "FP32", "FP64", "BF16"))
_F32 = np.dtype(np.float32)
_LEN = struct.Struct("<I")
MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32  # numpy's limit on array dimensions
MAX_SPAN = 1 << 48  # most elements the non-zero dimensions of an empty shape may span (numpy refuses far less than 2**63)


def bad_input(message: str) -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, message)


def element_count(name: str, shape: Iterable[int]) -> int:
    shape = list(shape)
    if any((not isinstance(d, int)) or isinstance(d, bool) or d < 0 for d in shape):
        raise bad_input(f"input '{name}': shape {shape} must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise bad_input(f"input '{name}': shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported")
    count = math.prod(shape)
    if not count and math.prod(d for d in shape if d) > MAX_SPAN:  # no elements, but no array has such a shape
        raise bad_input(f"input '{name}': shape {shape} is too large (its dimensions other than 0 multiply to "
                        f"more than {MAX_SPAN})")
    return count


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(arr: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))  # round to nearest even
    return (rounded >> 16).astype("<u2")


def decode_bytes(name: str, buf: bytes | memoryview, count: int | None = None) -> np.ndarray:
    """Length-prefixed BYTES elements -> 1-D object array of ``bytes``."""
    mv = memoryview(buf)
    out = []
    pos, end = 0, len(mv)
    while pos < end:
        if pos + 4 > end:
            raise bad_input(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (n,) = _LEN.unpack_from(mv, pos)
        pos += 4
        if pos + n > end:
            raise bad_input(f"input '{name}': BYTES element of {n} bytes runs past the end of the data")
        out.append(bytes(mv[pos:pos + n]))
        pos += n
    if count is not None and len(out) != count:
        raise bad_input(f"input '{name}': shape needs {count} BYTES elements, the data holds {len(out)}")
    arr = np.empty(len(out), dtype=object)
    arr[:] = out
    return arr


def encode_bytes(arr: Any) -> bytes:
    """An array (or list) of bytes/str elements -> the protocol's length-prefixed bytes."""
    flat = arr.ravel() if isinstance(arr, np.ndarray) else arr
    parts = []
    for item in flat:
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            item = str(item).encode("utf-8")
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_raw(name: str, datatype: str, shape: list[int], buf: bytes | memoryview) -> np.ndarray:
    """Raw little-endian bytes -> an array of ``shape`` viewing ``buf`` (BYTES, BF16 decode)."""
    count = element_count(name, shape)
    if datatype == "BYTES":
        return decode_bytes(name, buf, count).reshape(shape)
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise bad_input(f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}, BYTES")
    size = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
    if size != count * dtype.itemsize:
        raise bad_input(f"input '{name}': shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
                        f"got {size}")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return _bf16_to_f32(arr) if datatype == "BF16" else arr


def decode_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """JSON ``data`` (flat or nested, row-major) -> an array of ``shape``.

    Values must be of the datatype's kind, as Triton checks them: numbers for FP*, whole
    numbers for INT*/UINT* (1.0 passes, 0.7 is refused, never truncated), booleans (or 0/1)
    for BOOL, strings for BYTES; anything else is refused naming the element."""
    count = element_count(name, shape)
    if data is None or isinstance(data, (dict, str)) and datatype != "BYTES":
        raise bad_input(f"input '{name}': data must be a list of {datatype} values, got {_kind(data)}")
    if datatype == "BYTES":
        try:
            flat = np.asarray(data, dtype=object).ravel()
        except (TypeError, ValueError) as exc:
            raise bad_input(f"input '{name}': data is not a list of BYTES values ({exc})") from None
        arr = np.empty(flat.size, dtype=object)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                arr[i] = item.encode("utf-8")
            elif isinstance(item, (bytes, bytearray)):
                arr[i] = bytes(item)
            else:
                raise bad_input(f"input '{name}': BYTES data must be strings; element {i} is {_kind(item)}")
    else:
        dtype = DTYPES.get(datatype)
        if dtype is None:
            raise bad_input(f"input '{name}': unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}, BYTES")
        try:
            raw = np.asarray(data).ravel()
        except (TypeError, ValueError) as exc:
            raise bad_input(f"input '{name}': data is not a list of {datatype} values ({exc})") from None
        arr = _typed(name, datatype, dtype, raw, data)
    if arr.size != count:
        raise bad_input(f"input '{name}': shape {list(shape)} needs {count} elements, data has {arr.size}")
    return arr.reshape(shape)


def _kind(value: Any) -> str:
    """How an error names a JSON value that is of the wrong kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value[:40]!r} (a string)"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)[:40]


def _first(name: str, raw: np.ndarray, bad: np.ndarray, what: str) -> OspreyError:
    i = int(np.flatnonzero(bad)[0])
    return bad_input(f"input '{name}': element {i} is {_kind(raw[i].item() if raw.dtype != object else raw[i])}; "
                     f"{what}")


def _typed(name: str, datatype: str, dtype: np.dtype, raw: np.ndarray, data: Any) -> np.ndarray:
    """``raw`` (what JSON gave, numpy's own dtype for it) as ``datatype``, or a 400 naming the element."""
    kind = raw.dtype.kind
    if kind in "fiu" and datatype in _FLOATS:  # the common case first: numbers for a float type
        return raw.astype(dtype if datatype != "BF16" else _F32)
    if datatype == "BOOL":
        what = "BOOL takes true, false, 0 or 1"
        if kind == "b":
            return raw
        if kind in "iu":
            bad = (raw != 0) & (raw != 1)
            if bad.any():
                raise _first(name, raw, bad, what)
            return raw.astype(np.bool_)
    elif datatype in _FLOATS:
        what = f"{datatype} takes numbers"
    else:  # INT*, UINT*
        what = f"{datatype} takes whole numbers"
        if kind == "f":
            bad = ~np.isfinite(raw) | (raw != np.floor(raw))
            if bad.any():
                raise _first(name, raw, bad, what)
        if kind in "fiu":
            info = np.iinfo(dtype)
            out = (raw < info.min) | (raw > info.max)
            if out.any():
                raise _first(name, raw, out, f"out of range for {datatype} ({info.min}..{info.max})")
            return raw.astype(dtype)
    # strings, nulls, booleans where numbers belong, integers beyond int64: the values as sent
    # (numpy made [1, "a"] all strings), so that the first wrong one is named
    values = raw if kind == "O" else np.asarray(data, dtype=object).ravel()
    want = bool if datatype == "BOOL" else (int, float)
    bad = np.fromiter((isinstance(v, bool) is (datatype != "BOOL") or not isinstance(v, want) for v in values),
                      dtype=bool, count=values.size)
    if bad.any():
        raise _first(name, values, bad, what)
    try:
        return np.asarray(values.tolist(), dtype=_F32 if datatype == "BF16" else dtype)
    except OverflowError as exc:  # an integer numpy holds only as an object
        raise bad_input(f"input '{name}': data holds a value out of range for {datatype} ({exc})") from None


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in ("S", "U"):
        return "BYTES"
    dt = _BY_DTYPE.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    if dt is None:
        raise OspreyError(ErrorKind.PREDICTION_FAILED, f"output dtype {arr.dtype} has no protocol datatype")
    return dt


def as_array(value: Any, datatype: str | None = None) -> tuple[np.ndarray, str]:
    """A handler output (numpy, torch tensor, list, bytes) -> (array, protocol datatype).

    ``datatype`` is the declared output type, if any; BF16 keeps its wire bits (uint16).
    """
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # torch.Tensor, without importing torch
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            return t.contiguous().view(torch.int16).numpy().view("<u2"), "BF16"
        value = t.numpy()
    if isinstance(value, (bytes, bytearray, str)):
        arr = np.empty(1, dtype=object)
        arr[0] = value
        return arr, "BYTES"
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if datatype == "BF16":
        return _f32_to_bf16(arr), "BF16"
    if datatype and datatype != "BYTES" and datatype in DTYPES and arr.dtype != DTYPES[datatype]:
        arr = arr.astype(DTYPES[datatype])
    return arr, datatype_of(arr) if datatype != "BYTES" else "BYTES"


def encode_raw(arr: np.ndarray, datatype: str) -> bytes | memoryview:
    """An output array -> its raw little-endian bytes (a view where the array is contiguous)."""
    if datatype == "BYTES":
        return encode_bytes(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    return memoryview(arr).cast("B") if arr.size else b""


def to_json_data(arr: np.ndarray, datatype: str) -> list:
    """A flat row-major list for a JSON response (BYTES as UTF-8 strings where they decode)."""
    if datatype == "BYTES":
        out = []
        for item in arr.ravel():
            if isinstance(item, (bytes, bytearray)):
                try:
                    item = bytes(item).decode("utf-8")
                except UnicodeDecodeError:
                    item = bytes(item).decode("latin-1")
            out.append(item)
        return out
    if datatype == "BF16":
        return _bf16_to_f32(arr).ravel().tolist()
    return arr.ravel().tolist()
