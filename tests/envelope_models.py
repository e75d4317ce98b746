"""Handlers for the request envelope and HTTP streaming tests (tests/e2e/test_envelopes.py).

The same archives are served by real TorchServe 0.12 in
tests/fixtures/torchserve_envelopes/record.py; the tests compare Osprey's answers with what
it recorded.
"""

from __future__ import annotations

import json

__all__ = ["ECHO_HANDLER", "STREAM_HANDLER", "STREAM_HEADER_HANDLER", "CASES", "JSON"]

# Answers one item per item the envelope hands it, so each answer shows what the envelope
# passed: raw bytes as text, a KServe v2 input as a tensor (integers doubled, floats halved on
# explain, ``*_bool`` inputs as booleans, BYTES as given), anything else as {"echo": ...} (or
# {"explained": ...} on an explain call).
ECHO_HANDLER = '''
import torch


def _plain(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _one(item, explain):
    if isinstance(item, (bytes, bytearray)):
        return bytes(item).decode("utf-8")
    if isinstance(item, dict) and "datatype" in item and "name" in item:
        if item["datatype"] == "BYTES":
            return item["data"]
        t = torch.tensor(item["data"])
        if item["name"].endswith("_bool"):
            return t > 0
        return t * 0.5 if explain else t * 2
    return {"explained" if explain else "echo": _plain(item)}


def handle(data, context):
    if data is None:
        return None
    explain = context.get_request_header(0, "explain") == "True"
    return [_one(item, explain) for item in data]
'''

# TorchServe's streaming example: each part goes out through send_intermediate_predict_response,
# then the final answer. The body (JSON) may name the parts, the final answer, ``fail`` (raise
# after the parts) and ``gates`` (tests/gates.py: after part i, wait for gates[i] to open); a
# text body streams "hello " four times, then "world " (TorchServe's echo_stream example). It
# reads its rows with or without the body envelope (which hands it the bodies themselves).
STREAM_HANDLER = '''
import json

from ts.handler_utils.utils import send_intermediate_predict_response


def _options(row):
    body = row.get("data") or row.get("body") if isinstance(row, dict) and ("data" in row or "body" in row) else row
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(bytes(body))
        except ValueError:
            body = None
    return body if isinstance(body, dict) else {}


def handle(data, context):
    if data is None:
        return None
    opts = [_options(row) for row in data]
    parts = [o.get("parts", ["hello "] * 4) for o in opts]
    for i in range(max(len(p) for p in parts)):
        send_intermediate_predict_response([p[i] if i < len(p) else "" for p in parts], context.request_ids,
                                           "Intermediate Prediction success", 200, context)
        for o in opts:
            gates = o.get("gates") or []
            if i < len(gates):
                from tests.gates import hold
                hold(gates[i])
    if any(o.get("fail") for o in opts):
        raise ValueError("asked to fail after streaming")
    return [o.get("final", "world ") for o in opts]
'''

# The requests sent to both servers: envelope -> [(case, method, path, headers, body)]; the model is
# "echo" (ECHO_HANDLER), or "stream" (STREAM_HANDLER) without an envelope (key "").
JSON = {"Content-Type": "application/json"}
V1 = {"instances": [{"data": [1, 2]}, [3, 4], 5]}
V2 = {"id": "req-1", "inputs": [
    {"name": "ints", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
    {"name": "floats", "shape": [3], "datatype": "FP32", "data": [0.5, 1.5, 2.5]},
    {"name": "flags_bool", "shape": [2], "datatype": "INT64", "data": [0, 3]},
    {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
V2_NO_ID = {"inputs": [{"name": "x", "shape": [3], "datatype": "INT32", "data": [1, 2, 3]}]}
# every instance an object, or none: TorchServe's json envelope fails (503) on a mix of the two
JSON_ENV = {"instances": [{"b64": "aGVsbG8="}, {"x": {"b64": "d29ybGQ="}, "y": 1}]}
JSON_ENV_PLAIN = {"instances": [[1, 2], 3]}

CASES: dict[str, list[tuple[str, str, str, dict, bytes]]] = {
    "kserve": [
        ("v1_predict", "POST", "/v1/models/echo:predict", JSON, json.dumps(V1).encode()),
        ("v1_explain", "POST", "/v1/models/echo:explain", JSON, json.dumps(V1).encode()),
        ("v1_predict_no_content_type", "POST", "/v1/models/echo:predict", {}, json.dumps(V1).encode()),
        ("predictions_route", "POST", "/predictions/echo", JSON, json.dumps(V1).encode()),
        ("no_instances", "POST", "/v1/models/echo:predict", JSON, b'{"inputs": [1]}'),
        ("not_json", "POST", "/v1/models/echo:predict", {"Content-Type": "text/plain"}, b"hello"),
    ],
    "kservev2": [
        ("v2_infer", "POST", "/v2/models/echo/infer", JSON, json.dumps(V2).encode()),
        ("v2_explain", "POST", "/v2/models/echo/explain", JSON, json.dumps(V2).encode()),
        ("v2_infer_no_content_type", "POST", "/v2/models/echo/infer", {}, json.dumps(V2).encode()),
        ("v2_infer_no_id", "POST", "/v2/models/echo/infer", JSON, json.dumps(V2_NO_ID).encode()),
        ("predictions_route", "POST", "/predictions/echo", JSON, json.dumps(V2).encode()),
        ("no_inputs", "POST", "/v2/models/echo/infer", JSON, b'{"instances": [1]}'),
    ],
    "json": [
        ("instances", "POST", "/predictions/echo", JSON, json.dumps(JSON_ENV).encode()),
        ("plain_instances", "POST", "/predictions/echo", JSON, json.dumps(JSON_ENV_PLAIN).encode()),
        ("no_instances", "POST", "/predictions/echo", JSON, b'{"inputs": [1]}'),
    ],
    "body": [
        ("json_body", "POST", "/predictions/echo", JSON, b'{"a": 1}'),
        ("text_body", "POST", "/predictions/echo", {"Content-Type": "text/plain"}, b"hello"),
    ],
    "": [
        ("stream_text", "POST", "/predictions/stream", {"Content-Type": "text/plain"}, b"hello"),
        ("stream_json", "POST", "/predictions/stream", JSON,
         json.dumps({"parts": [{"n": 1}, "two "], "final": {"done": True}}).encode()),
        ("stream_then_fail", "POST", "/predictions/stream", JSON, json.dumps({"parts": ["a "], "fail": True}).encode()),
    ],
}


# streams two parts after setting a response header and the content type (TorchServe 0.12 starts
# the chunked answer with them: tests/fixtures/torchserve_model_deps/recorded.json "stream answer")
STREAM_HEADER_HANDLER = '''
from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    context.set_response_header(0, "X-Osprey-Note", "kept")
    context.set_response_content_type(0, "text/plain")
    for part in ("a ", "b "):
        send_intermediate_predict_response([part], context.request_ids, "Intermediate Prediction success", 200,
                                           context)
    return ["end"]
'''
