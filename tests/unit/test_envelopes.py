"""Request envelopes (handlers/envelopes.py) around a handler, with the real handler Context."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from handlers.context import Context, RequestProcessor
from handlers.envelopes import canonical_envelope, wrap_handle
from handlers.errors import InvalidInput
from server.settings import load_settings


def _context(*headers: dict) -> Context:
    ctx = Context("echo", "/tmp", {"model": {"modelName": "echo", "modelVersion": "1.0"}}, len(headers), None, "t")
    ctx.request_ids = {i: f"rid-{i}" for i in range(len(headers))}
    ctx.request_processor = [RequestProcessor(dict(h)) for h in headers]
    return ctx


def _recording(seen: list):
    def handle(data, context):
        seen.append((data, context.get_request_id(0), context.get_request_header(0, "explain")))
        return [f"answer-{x}" for x in data] if isinstance(data, list) else None
    return handle


def test_kserve_handles_each_request_of_a_batch_on_its_own():
    seen: list = []
    handle = wrap_handle(_recording(seen), "kserve")
    ctx = _context({"explain": "False"}, {"explain": "True"})
    rows = [{"body": {"instances": [1, 2]}}, {"body": b'{"instances": [3]}'}]
    assert handle(rows, ctx) == [{"predictions": ["answer-1", "answer-2"]}, {"explanations": ["answer-3"]}]
    # one call per request, each seeing its own id and headers at index 0 (TorchServe reads only the first)
    assert seen == [([1, 2], "rid-0", "False"), ([3], "rid-1", "True")]
    assert ctx.request_ids == {0: "rid-0", 1: "rid-1"} and len(ctx.request_processor) == 2  # restored


def test_kserve_status_set_by_the_handler_lands_on_its_request():
    def handle(data, context):
        if data == ["bad"]:
            context.set_response_status(422, "no", 0)
        return data
    ctx = _context({}, {})
    wrap_handle(handle, "kserve")([{"body": {"instances": ["ok"]}}, {"body": {"instances": ["bad"]}}], ctx)
    assert [rp.get_response_status_code() for rp in ctx.request_processor] == [200, 422]


@pytest.mark.parametrize("body, message", [
    ({"inputs": [1]}, "no 'instances' list"),
    ({"instances": {"a": 1}}, "'instances' must be a list"),
    (b"not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_kserve_bad_body_is_a_400_naming_it_before_the_handler_runs(body, message):
    seen: list = []
    with pytest.raises(InvalidInput) as info:
        wrap_handle(_recording(seen), "kserve")([{"body": body}], _context({}))
    assert info.value.error_code == 400 and message in info.value.message and "KServe v1" in info.value.message
    assert seen == []


def test_kservev2_outputs_carry_their_real_datatypes():
    def handle(data, context):
        return [torch.tensor(data[0]["data"]) * 2, torch.tensor([0.5], dtype=torch.float32),
                torch.tensor([True, False]), data[3]["data"], np.array([1, 2], dtype=np.int32)]
    body = {"id": "abc", "inputs": [
        {"name": "a", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [1], "datatype": "FP32", "data": [0.25]},
        {"name": "c", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        {"name": "d", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        {"name": "e", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}
    (out,) = wrap_handle(handle, "kservev2")([{"body": json.dumps(body).encode()}], _context({}))
    assert out["id"] == "abc" and out["model_name"] == "echo" and out["model_version"] == "1.0"
    assert [(o["name"], o["datatype"], o["shape"], o["data"]) for o in out["outputs"]] == [
        ("a", "INT64", [4], [2, 4, 6, 8]), ("b", "FP32", [1], [0.5]), ("c", "BOOL", [2], [True, False]),
        ("d", "BYTES", [1], ["hi"]), ("e", "INT32", [2], [1, 2])]


def test_kservev2_hands_inputs_reshaped_and_uses_the_request_id_without_an_id():
    seen: list = []

    def handle(data, context):
        seen.append(data)
        return [1]
    body = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    (out,) = wrap_handle(handle, "kservev2")([{"body": body}], _context({}))
    assert seen[0][0]["data"] == [[1, 2], [3, 4]]
    assert out["id"] == "rid-0" and out["outputs"] == [{"name": "x", "datatype": "INT64", "data": [1], "shape": [1]}]


@pytest.mark.parametrize("body, message", [
    ({"instances": [1]}, "no 'inputs' list"),
    ({"inputs": []}, "'inputs' is empty"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}, "inputs[0] has no 'shape'"),
    ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}, "does not fit shape [3]"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": []}]}, "non-empty list"),
])
def test_kservev2_bad_body_is_a_400_naming_it(body, message):
    with pytest.raises(InvalidInput) as info:
        wrap_handle(lambda d, c: d, "kservev2")([{"body": body}], _context({}))
    assert message in info.value.message


def test_kservev2_more_outputs_than_inputs_fails_the_request():
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}
    with pytest.raises(ValueError, match="2 outputs for 1 inputs"):
        wrap_handle(lambda d, c: [1, 2], "kservev2")([{"body": body}], _context({}))


def test_json_envelope_joins_the_batch_and_splits_the_answers():
    seen: list = []

    def handle(data, context):
        seen.append(data)
        return [str(x) for x in range(len(data))]
    rows = [{"body": {"instances": [{"b64": "aGk="}, {"x": {"b64": "eW8="}, "y": 1}]}}, {"body": {"instances": [7]}}]
    out = wrap_handle(handle, "json")(rows, _context({}, {}))
    assert seen == [[b"hi", {"x": b"yo", "y": 1}, 7]]
    assert [json.loads(o) for o in out] == [{"predictions": ["0", "1"]}, {"predictions": ["2"]}]
    with pytest.raises(InvalidInput, match="no 'instances' list"):
        wrap_handle(handle, "json")([{"body": {"inputs": [1]}}], _context({}))


def test_body_envelope_and_the_initialization_call():
    seen: list = []

    def handle(data, context):
        seen.append(data)
        return data
    handle_b = wrap_handle(handle, "body")
    assert handle_b([{"body": {"a": 1}}, {"data": "text"}], _context({}, {})) == [{"a": 1}, "text"]
    for name in ("body", "json", "kserve", "kservev2"):
        assert wrap_handle(handle, name)(None, _context()) is None  # TorchServe's handle(None, context) at load
    assert seen[-1] is None


def test_setting_names_and_torchserve_aliases(tmp_path):
    assert canonical_envelope("kfserving") == "kserve" and canonical_envelope("KFServingV2") == "kservev2"
    props = tmp_path / "config.properties"
    props.write_text("service_envelope=kfservingv2\n")
    assert load_settings(props, env={}).service_envelope == "kservev2"
    props.write_text("service_envelope=seldon\n")
    with pytest.raises(ValueError, match="service_envelope: 'seldon' must be one of body, json, kserve, kservev2"):
        load_settings(props, env={})
