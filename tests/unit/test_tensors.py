"""Protocol tensors <-> numpy: zero-copy views, BYTES framing, BF16, shape checks."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from handlers.streaming import decode_predict_response
from server.core.errors import OspreyError
from server.core.codecs import fields_from_tensors
from server.core.tensors import (DTYPES, as_array, decode_bytes, decode_json, decode_raw, encode_bytes, encode_raw,
                            to_json_data)


@pytest.mark.parametrize("datatype", [d for d in DTYPES if d != "BF16"])
def test_raw_round_trip_every_fixed_datatype(datatype):
    arr = (np.arange(6) % 2 == 1) if datatype == "BOOL" else np.arange(6).astype(DTYPES[datatype])
    arr = arr.reshape(2, 3)
    raw = bytes(encode_raw(arr, datatype))
    assert len(raw) == 6 * DTYPES[datatype].itemsize
    back = decode_raw("x", datatype, [2, 3], raw)
    assert back.dtype == DTYPES[datatype] and back.shape == (2, 3)
    np.testing.assert_array_equal(back, arr)


def test_raw_decode_is_a_view_of_the_request_bytes():
    body = bytearray(np.arange(4, dtype="<f4").tobytes())
    arr = decode_raw("x", "FP32", [4], memoryview(body))
    body[0:4] = np.float32(42).tobytes()
    assert arr[0] == 42  # no copy was made
    assert not arr.flags.owndata


def test_shape_that_does_not_match_the_data_names_the_input():
    with pytest.raises(OspreyError) as exc:
        decode_raw("INPUT0", "FP32", [2, 3], b"\0" * 20)
    assert exc.value.status == 400
    assert "INPUT0" in exc.value.message and "24 bytes" in exc.value.message
    with pytest.raises(OspreyError) as exc:
        decode_json("B", "INT64", [2, 2], [1, 2, 3])
    assert exc.value.status == 400 and "'B'" in exc.value.message
    with pytest.raises(OspreyError, match="non-negative"):
        decode_raw("C", "FP32", [-1, 2], b"")
    with pytest.raises(OspreyError, match="unknown datatype"):
        decode_raw("D", "FP128", [1], b"\0" * 16)


def test_bytes_framing_round_trip_and_errors():
    items = [b"", b"abc", "h\u00e9llo".encode(), bytes(range(256))]
    raw = encode_bytes(np.array(items, dtype=object))
    assert raw[:4] == struct.pack("<I", 0) and raw[4:8] == struct.pack("<I", 3)
    back = decode_raw("s", "BYTES", [2, 2], raw)
    assert back.shape == (2, 2) and list(back.ravel()) == items
    with pytest.raises(OspreyError, match="'s'.*4 BYTES elements, the data holds 3"):
        decode_raw("s", "BYTES", [4], encode_bytes(items[:3]))
    with pytest.raises(OspreyError, match="runs past the end"):
        decode_bytes("s", struct.pack("<I", 10) + b"abc")
    with pytest.raises(OspreyError, match="inside an element's 4-byte length"):
        decode_bytes("s", b"\1\0")


def test_bf16_decodes_to_float32_and_encodes_with_rounding():
    values = np.array([1.0, -2.5, 3.140625, 65280.0], dtype=np.float32)  # exactly representable in bf16
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    decoded = decode_raw("h", "BF16", [4], bits.tobytes())
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, values)
    arr, dt = as_array(np.array([1.00390625], dtype=np.float32), "BF16")  # halfway: rounds to even (1.0)
    assert dt == "BF16" and arr.tolist() == [0x3F80]
    assert to_json_data(arr, "BF16") == [1.0]


def test_as_array_from_torch_keeps_dtype_including_bfloat16():
    torch = pytest.importorskip("torch")
    arr, dt = as_array(torch.tensor([[1.5, 2.0]], dtype=torch.float16))
    assert dt == "FP16" and arr.shape == (1, 2)
    arr, dt = as_array(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    assert dt == "BF16"
    np.testing.assert_array_equal(decode_raw("o", "BF16", [2], bytes(encode_raw(arr, dt))), [1.0, -2.0])


def test_json_data_flat_or_nested_and_bytes_as_text():
    np.testing.assert_array_equal(decode_json("x", "FP32", [2, 2], [[1, 2], [3, 4]]), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(decode_json("x", "FP32", [2, 2], [1, 2, 3, 4]), [[1, 2], [3, 4]])
    arr = decode_json("t", "BYTES", [2], ["a", "b\u00e9"])
    assert list(arr) == [b"a", "b\u00e9".encode()]
    assert to_json_data(arr, "BYTES") == ["a", "b\u00e9"]
    with pytest.raises(OspreyError, match="'x': element 0 is 'nope' \\(a string\\); INT32 takes whole numbers"):
        decode_json("x", "INT32", [1], ["nope"])


@pytest.mark.parametrize("datatype, data, message", [
    ("INT32", [1, 0.7], "element 1 is 0.7; INT32 takes whole numbers"),  # never truncated to 0
    ("INT8", [300], r"element 0 is 300; out of range for INT8 \(-128..127\)"),
    ("UINT8", [-1], r"element 0 is -1; out of range for UINT8"),
    ("INT32", [1, "a"], r"element 1 is 'a' \(a string\); INT32 takes whole numbers"),
    ("INT32", [True, False], r"element 0 is true \(a boolean\); INT32 takes whole numbers"),
    ("FP32", ["1.5", 2], r"element 0 is '1.5' \(a string\); FP32 takes numbers"),
    ("FP32", [None, 1.0], "element 0 is null; FP32 takes numbers"),
    ("BOOL", ["x", "y"], r"element 0 is 'x' \(a string\); BOOL takes true, false, 0 or 1"),
    ("BOOL", [0, 2], "element 1 is 2; BOOL takes true, false, 0 or 1"),
    ("BYTES", [None, "a"], "BYTES data must be strings; element 0 is null"),
    ("BYTES", ["a", {"a": 1}], "BYTES data must be strings; element 1 is an object"),
    ("FP32", None, "data must be a list of FP32 values, got null"),
])
def test_json_data_of_the_wrong_kind_is_refused_naming_the_element(datatype, data, message):
    """As Triton checks JSON tensor data: a value is never cast into another kind (a 0.7 into
    INT32's 0, a string into a float, "x" into True, null into "None")."""
    with pytest.raises(OspreyError, match=f"input 'x': {message}") as err:
        decode_json("x", datatype, [2] if isinstance(data, list) and len(data) == 2 else [1], data)
    assert err.value.kind.name == "BAD_INPUT"


def test_json_data_that_fits_its_datatype_without_loss_is_taken():
    assert decode_json("x", "INT32", [2], [1.0, 2.0]).tolist() == [1, 2]  # whole numbers written as floats
    assert decode_json("x", "BOOL", [2], [0, 1]).tolist() == [False, True]
    assert decode_json("x", "FP32", [2], [1, 2.5]).dtype == np.float32
    assert decode_json("x", "UINT64", [1], [2**64 - 1]).tolist() == [2**64 - 1]
    assert decode_json("x", "BYTES", [1, 1], [["a"]]).tolist() == [[b"a"]]


def test_tensors_reach_a_bytes_handler_as_fields():
    one = np.empty(1, dtype=object)
    one[0] = b"hello"
    fields = fields_from_tensors({"text": one}, {"text": {"content_type": "text/plain"}})
    assert list(fields) == ["body"] and fields["body"].value == b"hello"
    assert fields["body"].content_type == "text/plain"
    fields = fields_from_tensors({"a": np.arange(3, dtype=np.float16), "b": np.arange(2).reshape(1, 2)})
    assert fields["a"].value == b"[0.0,1.0,2.0]" and fields["b"].value == b"[[0,1]]"
    assert fields["a"].content_type == "application/json"


def test_torchserve_intermediate_frame_is_decoded():
    ts_utils = pytest.importorskip("ts.protocol.otf_message_handler")
    from handlers.context import Context

    ctx = Context("m", "/tmp", {}, 2, None, "0")
    ctx.request_ids = {0: "r-0", 1: "r-1"}
    from handlers.context import RequestProcessor

    ctx.request_processor = [RequestProcessor({}), RequestProcessor({})]
    got = {}
    ctx.stream_writers = {1: lambda data: got.setdefault(1, data)}
    frame = ts_utils.create_predict_response(["zero", {"k": 1}], ctx.request_ids, "ok", 200, ctx, True)
    code, message, items = decode_predict_response(frame)
    assert code == 200 and message == "ok"
    assert [i["request_id"] for i in items] == ["r-0", "r-1"]
    assert items[0]["body"] == b"zero" and items[1]["headers"]["ts_stream_next"] == "true"
    ctx.cl_socket.sendall(frame)
    assert got == {1: b'{\n  "k": 1\n}'}  # only the request that streams; TorchServe's JSON
    assert "ts_stream_next" not in ctx.get_response_headers(1)
