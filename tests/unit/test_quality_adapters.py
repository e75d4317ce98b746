"""The feedback and monitoring adapters over a fake MonitorPort: REST routes (through the
ASGI router: auth, body limit, error bodies), the gRPC ``osprey.Monitoring`` servicer (a real
in-process gRPC server with the ErrorStatus interceptor) and the data plane between them
(404 unknown model, 503 monitoring off, 404 monitoring off for the model)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import struct_pb2

from monitoring.quality import QualityMonitor
from server.core.capture import FeedbackItem, FeedbackResult, Observation
from server.core.dataplane import DataPlane
from server.core.errors import ErrorKind, OspreyError
from server.core.model_config import ModelConfig, MonitoringConfig
from server.protocols.grpc.generated import osprey_monitoring_pb2 as pb
from server.protocols.grpc.generated import osprey_monitoring_pb2_grpc as pb_grpc
from server.protocols.grpc.monitoring import MonitoringServicer, label_of
from server.protocols.grpc.status import ErrorStatus
from server.protocols.rest.asgi import Router
from server.protocols.rest.monitoring import add_monitoring_routes, parse_feedback


class FakeRegistry:
    def __init__(self):
        self.configs = {("clf", "1"): ModelConfig(), ("clf", "2"): ModelConfig(),
                        ("quiet", "1"): ModelConfig(monitoring=MonitoringConfig(enabled=False))}
        self._made: dict = {}

    def get(self, name, version=None):
        version = version or ("2" if name == "clf" else "1")
        if (name, version) not in self.configs:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found: {name} {version or ''}".strip())
        return self._made.setdefault((name, version), SimpleNamespace(name=name, version=version, instances=[],
                                                                      config=self.configs[(name, version)]))

    def versions(self, name):
        return [self.get(n, v) for n, v in self.configs if n == name]


class FakeMonitor:
    """A MonitorPort whose quality part is a real QualityMonitor per version."""

    def __init__(self):
        self.parts: dict[tuple[str, str], QualityMonitor] = {}
        self.calls: list = []

    def part(self, model, version):
        return self.parts.setdefault((model, version), QualityMonitor(model, version))

    def observe(self, obs: Observation) -> None:
        self.part(obs.model, obs.version).record(obs)

    async def feedback(self, model, version, items, others=(), flushed=False, marks=()) -> FeedbackResult:
        self.calls.append(("feedback", model, version, list(items), list(others)))
        return await asyncio.to_thread(self.part(model, version).feedback, items)

    def status(self, model, version):
        self.calls.append(("status", model, version))
        return {"model": model, "version": version, "quality": self.part(model, version).status(),
                "drift": {"score": np.float64(0.25)}}

    def forget(self, model, version):
        self.parts.pop((model, version), None)


def _plane(monitor=True):
    dp = DataPlane(FakeRegistry(), monitor=FakeMonitor() if monitor else None)
    dp.monitor and dp.monitor.observe(Observation(
        "clf", "2", ["a", "b", "c"], 0.0, task="classification",
        outputs=np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32), classes=("no", "yes")))
    return dp


def _client(dp, token=None, max_body=10_000):
    router = Router(max_body=max_body, token=token)
    add_monitoring_routes(router, dp)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://osprey")


def run(coro):
    return asyncio.run(coro)


# --- parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize("body,message", [
    (b"", "the feedback body is empty"),
    (b"{nope", "not valid JSON"),
    (b"42", "the body must be"),
    (b"[]", "no feedback items"),
    (b'{"feedback": {"request_id": "a"}}', "'feedback' must be a list"),
    (b'[{"request_id": "a", "label": 1}, "x"]', "feedback[1] must be an object"),
    (b'[{"label": 1}]', "feedback[0] has no 'request_id'"),
    (b'[{"request_id": "", "label": 1}]', "feedback[0]: 'request_id' must be a non-empty string"),
    (b'{"request_id": "a"}', "feedback[0] (request_id 'a') has no 'label'"),
    (b'{"request_id": "a", "label": null}', "'label' must be a string, a number, a boolean or a list of them, got null"),
    (b'{"request_id": "a", "label": {"x": 1}}', "got dict"),
    (b'{"request_id": "a", "label": [[1], 2]}', "got list"),
    (b'{"request_id": "a", "label": []}', "got list"),
    (b'{"request_id": "a", "label": [1, NaN]}', "not valid JSON"),
])
def test_malformed_bodies_are_refused_naming_what_is_wrong(body, message):
    with pytest.raises(OspreyError) as exc:
        parse_feedback(body)
    assert exc.value.kind is ErrorKind.BAD_INPUT and message in exc.value.message


def test_the_three_body_shapes():
    one = parse_feedback(b'{"request_id": "a", "label": "yes"}')
    many = parse_feedback(b'[{"request_id": "a", "label": "yes"}, {"request_id": 7, "label": 2.5}]')
    wrapped = parse_feedback(b'{"feedback": [{"request_id": "a", "label": [1, 2]}]}')
    # one label per record of a request that held several: class names too
    assert parse_feedback(b'{"request_id": "a", "label": ["benign", "malignant", 1]}')[0].label == [
        "benign", "malignant", 1]
    assert one == [FeedbackItem("a", "yes", 0)]
    assert many == [FeedbackItem("a", "yes", 0), FeedbackItem("7", 2.5, 1)]
    assert wrapped == [FeedbackItem("a", [1, 2], 0)]


# --- REST ----------------------------------------------------------------------------------
def test_rest_feedback_counts_and_names_invalid_items():
    dp = _plane()

    async def go():
        async with _client(dp) as c:
            r = await c.post("/feedback/clf", json={"feedback": [
                {"request_id": "a", "label": "no"}, {"request_id": "b", "label": "maybe"},
                {"request_id": "zz", "label": "yes"}, {"request_id": "a", "label": "no"}]})
            assert r.status_code == 200, r.text
            assert r.json() == {"accepted": 1, "unmatched": 2, "invalid": 1, "unmatched_ids": ["zz", "a"], "errors": [
                "feedback[1] (request_id 'b'): label 'maybe' is not a class of this model (one of ['no', 'yes'])"]}
            r = await c.post("/feedback/clf/2", json={"request_id": "b", "label": 1})
            assert r.json() == {"accepted": 1, "unmatched": 0, "invalid": 0}
            # every item invalid: 400 naming it, counts in the body
            r = await c.post("/feedback/clf", json={"request_id": "c", "label": "maybe"})
            assert r.status_code == 400
            body = r.json()
            assert body["invalid"] == 1 and body["type"] == "BadRequestException" and "feedback[0]" in body["message"]
            r = await c.get("/monitoring/clf")
            assert r.status_code == 200
            status = r.json()
            assert status["version"] == "2" and status["quality"]["labels"] == 2 and status["drift"]["score"] == 0.25
            assert (await c.get("/monitoring/clf/2")).json()["quality"]["invalid"] == 2
    run(go())
    assert dp.monitor.calls[0][:3] == ("feedback", "clf", "2")
    assert dp.monitor.calls[0][4] == ["1"]  # no version named: the other version's answers may be labelled too


def test_rest_errors_unknown_model_monitoring_off_malformed_too_large_auth():
    async def go():
        async with _client(_plane(), token="secret", max_body=200) as c:
            auth = {"authorization": "Bearer secret"}
            assert (await c.get("/monitoring/clf")).status_code == 401
            r = await c.post("/feedback/nope", json={"request_id": "a", "label": 1}, headers=auth)
            assert r.status_code == 404 and "nope" in r.json()["message"]
            assert (await c.get("/monitoring/clf/9", headers=auth)).status_code == 404
            r = await c.get("/monitoring/quiet", headers=auth)
            assert r.status_code == 404 and "monitoring is off for model quiet" in r.json()["message"]
            r = await c.post("/feedback/clf", content=b"{", headers=auth)
            assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
            r = await c.post("/feedback/clf", json=[{"request_id": f"r{i}", "label": 1} for i in range(20)], headers=auth)
            assert r.status_code == 413 and "max_request_size" in r.json()["message"]
        async with _client(_plane(monitor=False)) as c:
            r = await c.post("/feedback/clf", json={"request_id": "a", "label": 1})
            assert r.status_code == 503 and "monitoring is off on this server" in r.json()["message"]
            assert (await c.get("/monitoring/clf")).status_code == 503
            assert (await c.get("/monitoring/nope")).status_code == 404  # the model first
    run(go())


# --- gRPC ----------------------------------------------------------------------------------
def test_label_values():
    v = struct_pb2.Value
    assert label_of(v(number_value=3.0), "x") == 3 and isinstance(label_of(v(number_value=3.0), "x"), int)
    assert label_of(v(number_value=2.5), "x") == 2.5
    assert label_of(v(string_value="dog"), "x") == "dog"
    assert label_of(v(bool_value=True), "x") is True
    lst = v()
    lst.list_value.values.add(number_value=1.0)
    lst.list_value.values.add(number_value=2.5)
    assert label_of(lst, "x") == [1, 2.5]
    names = v()  # one label per record of a request that held several, as REST's JSON takes them
    for name in ("benign", "malignant"):
        names.list_value.values.add(string_value=name)
    names.list_value.values.add(bool_value=False)
    assert label_of(names, "x") == ["benign", "malignant", False]
    deep = v()  # one list of values per example is a label ([[1.0]]); a list of those is not
    deep.list_value.values.add().list_value.values.add(number_value=1.0)
    assert label_of(deep, "x") == [[1]]
    nested = v()
    nested.list_value.values.add().list_value.values.add().list_value.values.add(number_value=1.0)
    obj = v()
    obj.struct_value.fields["a"].number_value = 1
    for bad, named in ((v(null_value=0), "got null"), (v(struct_value=struct_pb2.Struct()), "got dict"),
                       (obj, "got dict"), (nested, "got list")):
        with pytest.raises(OspreyError, match=f"'label' must be .*, {named}"):
            label_of(bad, "feedback[0]")


def test_grpc_feedback_and_model_monitoring():
    from tests.conftest import free_port

    async def go():
        dp = _plane()
        server = grpc.aio.server(interceptors=[ErrorStatus()])
        pb_grpc.add_MonitoringServicer_to_server(MonitoringServicer(dp), server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.MonitoringStub(ch)
                req = pb.FeedbackRequest(model_name="clf")
                req.items.add(request_id="a").label.string_value = "no"
                req.items.add(request_id="b").label.number_value = 7
                req.items.add(request_id="zz").label.bool_value = True
                r = await stub.Feedback(req)
                assert (r.accepted, r.unmatched, r.invalid) == (1, 1, 1)
                assert list(r.errors) == ["feedback[1] (request_id 'b'): label 7 is not a class of this model: "
                                          "it has 2 classes (['no', 'yes'])"]
                m = await stub.ModelMonitoring(pb.ModelMonitoringRequest(model_name="clf", model_version="2"))
                assert json.loads(m.json)["quality"]["labels"] == 1
                assert m.status["quality"]["labels"] == 1.0 and m.status["drift"]["score"] == 0.25
                for request, code, text in [
                    (pb.FeedbackRequest(model_name="nope", items=[pb.FeedbackItem(request_id="a", label=struct_pb2.Value(
                        number_value=1))]), grpc.StatusCode.NOT_FOUND, "nope"),
                    (pb.FeedbackRequest(model_name="clf"), grpc.StatusCode.INVALID_ARGUMENT, "'items' is empty"),
                    (pb.FeedbackRequest(model_name="clf", items=[pb.FeedbackItem(request_id="a")]),
                     grpc.StatusCode.INVALID_ARGUMENT, "feedback[0] (request_id 'a') has no 'label'"),
                    (pb.FeedbackRequest(model_name="clf", items=[pb.FeedbackItem(label=struct_pb2.Value(
                        number_value=1))]), grpc.StatusCode.INVALID_ARGUMENT, "feedback[0] has no 'request_id'"),
                    (pb.FeedbackRequest(model_name="clf", items=[pb.FeedbackItem(request_id="c", label=struct_pb2.Value(
                        string_value="maybe"))]), grpc.StatusCode.INVALID_ARGUMENT, "no label was accepted"),
                ]:
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await stub.Feedback(request)
                    assert exc.value.code() == code and text in exc.value.details(), exc.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.ModelMonitoring(pb.ModelMonitoringRequest(model_name="quiet"))
                assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(None)
    run(go())
