"""Bad input to the core never jams a model, never answers 500 and never runs away.

Against one real server (the module's): a NaN or infinite OIP ``timeout`` (gRPC and REST v2)
is refused with 400 / INVALID_ARGUMENT naming ``timeout`` and the model keeps answering;
register and scale calls with NaN, infinite, oversized or wrongly typed values, NUL bytes
or over-long URLs and names are refused naming the parameter (REST and gRPC); the workers
a model starts stop at ``max_workers_per_model`` while a legal scale-up to it keeps serving,
and ``maxWorkers`` (only recorded, as in TorchServe) may exceed it; a model unregistered
while a scale waits or loads leaves no worker running. In process: a worker thread that
cannot start leaves nothing behind, concurrent scale-ups together stay under the cap, and
the batcher keeps serving whatever a request or an instance does.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import httpx
import numpy as np
import pytest

from server.core.batching import Batcher
from server.core.errors import ErrorKind, OspreyError
from server.protocols.grpc.generated import management_pb2 as mpb
from server.protocols.grpc.generated import management_pb2_grpc as mpb_grpc
from server.core.model_config import parse_model_config
from server.core.types import InferenceRequest, InferenceResponse, Ticket
from tests.models import handler_archive, mlp_archive
from tests.oip_stubs import pb, pb_grpc

ROW = [float(i) for i in range(16)]
CAP = 8  # the module server's max_workers_per_model


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    mlp_archive(store, "mlp")
    server = osprey_module(["mlp=mlp.mar"], store, config={"max_workers_per_model": CAP})
    server.store = store
    return server


@pytest.fixture(scope="module")
def oip(srv):
    with grpc.insecure_channel(srv.grpc) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def mgmt(srv):
    with grpc.insecure_channel(srv.grpc_management) as channel:
        yield mpb_grpc.ManagementAPIsServiceStub(channel)


def serves(srv, model: str = "mlp") -> None:
    """The model answers a normal request, promptly (a jammed one waits for its responseTimeout)."""
    t0 = time.monotonic()
    r = httpx.post(f"{srv.inference}/predictions/{model}", json=ROW, timeout=10)
    assert r.status_code == 200, r.text
    assert len(r.json()) == 4 and time.monotonic() - t0 < 5


def refused(r: httpx.Response, *words: str) -> str:
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    for word in words:
        assert word in message, message
    return message


def grpc_refused(call, request, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for word in words:
        assert word in info.value.details(), info.value.details()
    return info.value.details()


def infer_request(**params: pb.InferParameter) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[16]))
    req.raw_input_contents.append(np.asarray(ROW, dtype=np.float32).tobytes())
    for key, value in params.items():
        req.parameters[key].CopyFrom(value)
    return req


def registered(srv) -> set[str]:
    r = httpx.get(f"{srv.management}/models")
    assert r.status_code == 200, r.text
    return {m["modelName"] for m in r.json()["models"]}


# --- 1. a NaN timeout jammed the model ---------------------------------------------------
@pytest.mark.parametrize("timeout", [
    pb.InferParameter(double_param=math.nan),
    pb.InferParameter(double_param=math.inf),
    pb.InferParameter(double_param=-math.inf),
    pb.InferParameter(int64_param=-1),
    pb.InferParameter(string_param="soon"),
], ids=["nan", "inf", "-inf", "negative", "text"])
def test_grpc_timeout_that_is_no_time_is_invalid_argument_and_the_model_keeps_serving(srv, oip, timeout):
    grpc_refused(oip.ModelInfer, infer_request(timeout=timeout), "timeout")
    reply = oip.ModelInfer(infer_request(timeout=pb.InferParameter(int64_param=10_000_000)), timeout=5)
    assert reply.model_name == "mlp" and len(reply.raw_output_contents) == 1
    serves(srv)


@pytest.mark.parametrize("timeout", ["nan", "Infinity", -1, [5], True])
def test_rest_v2_timeout_that_is_no_time_is_refused_and_the_model_keeps_serving(srv, timeout):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [16], "data": ROW}]}
    r = httpx.post(f"{srv.inference}/v2/models/mlp/infer", json=body | {"parameters": {"timeout": timeout}})
    assert r.status_code == 400, r.text
    assert "timeout" in r.json()["error"]
    for ok in (10_000_000, 1e300):  # a far deadline is cut to the model's responseTimeout
        r = httpx.post(f"{srv.inference}/v2/models/mlp/infer", json=body | {"parameters": {"timeout": ok}}, timeout=5)
        assert r.status_code == 200, r.text
    serves(srv)


# --- 3. register and scale: numbers, URLs, names ------------------------------------------
@pytest.mark.parametrize("params, words", [
    ({"response_timeout": "nan"}, ["response_timeout"]),
    ({"response_timeout": "inf"}, ["response_timeout"]),
    ({"max_batch_delay": "nan"}, ["max_batch_delay"]),
    ({"startup_timeout": "1e12"}, ["startup_timeout", "604800"]),
    ({"batch_size": "99999999999999999999"}, ["batch_size", "100000"]),
    ({"batch_size": "0"}, ["batch_size"]),
    ({"initial_workers": str(CAP + 1)}, ["initial_workers", str(CAP), "max_workers_per_model"]),
    ({"initial_workers": "1000000000000"}, ["initial_workers", str(CAP)]),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_register_numbers_out_of_range_are_refused_naming_the_parameter(srv, params, words):
    r = httpx.post(f"{srv.management}/models", params={"url": "mlp.mar", "model_name": "other", **params})
    refused(r, *words)
    assert httpx.get(f"{srv.management}/models/other").status_code == 404
    assert httpx.get(f"{srv.management}/models/mlp").status_code == 200
    serves(srv)


URL_LONG = "a" * 5000
@pytest.mark.parametrize("params, body, words", [
    ({"url": "mlp.mar\x00x"}, None, ["url", "NUL"]),
    ({"url": URL_LONG}, None, ["url", "4096"]),
    ({"url": "a" * 300}, None, ["not a usable path", "File name too long"]),
    ({"url": "file:///tmp/" + "a" * 300}, None, ["not a usable path"]),
    ({"url": "mlp.mar", "model_name": "n" * 256}, None, ["name", "255"]),
    ({"url": "mlp.mar", "model_name": "bad\x00name"}, None, ["name"]),
    (None, {"url": 5}, ["url", "string"]),
    (None, {"url": ["mlp.mar"]}, ["url", "string"]),
    (None, {"url": "mlp.mar", "model_name": 5}, ["model_name", "string"]),
    (None, {"url": "mlp.mar", "model_name": "h", "handler": {"a": 1}}, ["handler"]),
    (None, {"url": "mlp.mar", "model_name": "f", "batch_size": 2.7}, ["batch_size"]),
    (None, {"url": "mlp.mar", "model_name": "f", "batch_size": 99999999999999999999}, ["batch_size"]),
    (None, {"url": "mlp.mar", "model_name": "f", "response_timeout": [1]}, ["response_timeout"]),
], ids=["nul", "5000-chars", "300-char-file", "300-char-file-url", "long-name", "nul-name", "url-int",
        "url-list", "name-int", "handler-dict", "batch-float", "batch-huge", "timeout-list"])
def test_bad_urls_names_and_types_are_refused_and_register_nothing(srv, params, body, words):
    before = registered(srv)
    r = httpx.post(f"{srv.management}/models", params=params, json=body)
    message = refused(r, *words)
    assert str(srv.store) not in message  # the server's own folders stay private
    assert registered(srv) == before
    serves(srv)


def test_a_name_at_the_length_limit_registers_serves_and_unregisters(srv):
    name = "n" * 255
    r = httpx.post(f"{srv.management}/models", params={"url": "mlp.mar", "model_name": name})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.management}/models/{name}").json()[0]["modelName"] == name
    serves(srv, name)
    assert httpx.delete(f"{srv.management}/models/{name}").status_code == 200


def test_describe_answers_after_refused_huge_numbers(srv):
    """A batch_size beyond 64 bits once registered and then made every describe answer 500."""
    r = httpx.post(f"{srv.management}/models", params={"url": "mlp.mar", "model_name": "huge",
                                                       "batch_size": "99999999999999999999"})
    refused(r, "batch_size")
    assert httpx.get(f"{srv.management}/models/huge").status_code == 404
    d = httpx.get(f"{srv.management}/models/mlp")
    assert d.status_code == 200 and d.json()[0]["batchSize"] == 1
    assert httpx.get(f"{srv.management}/models").status_code == 200


def test_max_workers_above_the_cap_is_recorded_as_torchserve_does(srv, mgmt):
    """maxWorkers only records a bound (Osprey starts minWorkers): 100 in model-config.yaml,
    in a scale call or over gRPC is accepted although the server starts at most CAP."""
    mlp_archive(srv.store, "wide", config={"minWorkers": 1, "maxWorkers": 100})
    m = srv.management
    r = httpx.post(f"{m}/models", params={"url": "wide.mar"}, timeout=30)
    assert r.status_code == 200, r.text
    try:
        d = httpx.get(f"{m}/models/wide").json()[0]
        assert (d["minWorkers"], d["maxWorkers"], len(d["workers"])) == (1, 100, 1)
        serves(srv, "wide")
        r = httpx.put(f"{m}/models/wide", params={"min_worker": "2", "max_worker": "100", "synchronous": "true"},
                      timeout=30)
        assert r.status_code == 200, r.text
        mgmt.ScaleWorker(mpb.ScaleWorkerRequest(model_name="wide", min_worker=2, max_worker=1000, synchronous=True),
                         timeout=30)
        d = httpx.get(f"{m}/models/wide").json()[0]
        assert (d["minWorkers"], d["maxWorkers"], len(d["workers"])) == (2, 1000, 2)
        serves(srv, "wide")
        refused(httpx.put(f"{m}/models/wide", params={"min_worker": str(CAP + 1), "max_worker": "100"}),
                "min_worker", str(CAP), "max_workers_per_model")
    finally:
        assert httpx.delete(f"{m}/models/wide").status_code == 200


# --- 2. scaling: a cap, and a legal scale-up that keeps serving ---------------------------
def test_scale_beyond_the_cap_is_refused_and_starts_nothing(srv):
    m = srv.management
    r = httpx.put(f"{m}/models/mlp", params={"min_worker": "1000000000000", "max_worker": "1000000000000",
                                            "synchronous": "false"})
    refused(r, "min_worker", str(CAP), "max_workers_per_model")
    r = httpx.put(f"{m}/models/mlp", params={"min_worker": "-1"})  # TorchServe's 500 (its quirk, matched)
    assert r.status_code == 500 and "min_worker" in r.json()["message"], r.text
    refused(httpx.put(f"{m}/models/mlp", params={"max_worker": "99999999999999999999"}), "max_worker")
    time.sleep(0.2)  # a scale that slipped through would be starting workers now
    d = httpx.get(f"{m}/models/mlp").json()[0]
    assert len(d["workers"]) == 1 and d["minWorkers"] == 1
    serves(srv)


def test_scale_up_to_the_cap_keeps_answering_and_scales_back(srv):
    m = srv.management
    r = httpx.put(f"{m}/models/mlp", params={"min_worker": str(CAP), "synchronous": "false"})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while True:
        serves(srv)
        ready = sum(w["status"] == "READY" for w in httpx.get(f"{m}/models/mlp").json()[0]["workers"])
        if ready == CAP or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert ready == CAP
    r = httpx.put(f"{m}/models/mlp", params={"min_worker": "1", "synchronous": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(httpx.get(f"{m}/models/mlp").json()[0]["workers"]) == 1
    serves(srv)


# A handler that takes LOAD_S to load and reports, through files in a probe folder, each
# instance thread that finished loading and each one that has since ended.
LOAD_S = 1.0
SLOW_LOADING_HANDLER = """
import os, threading, time, uuid

PROBE = {probe!r}

class SlowLoading:
    def initialize(self, context):
        time.sleep({load_s})
        me, tag = threading.current_thread(), uuid.uuid4().hex
        open(os.path.join(PROBE, "started-" + tag), "w").close()

        def watch():
            me.join()
            open(os.path.join(PROBE, "ended-" + tag), "w").close()
        threading.Thread(target=watch, daemon=True).start()

    def handle(self, data, context):
        return ["ok"] * len(data)
"""


def _threads(probe) -> tuple[int, int]:
    names = [p.name for p in probe.iterdir()]
    return sum(n.startswith("started-") for n in names), sum(n.startswith("ended-") for n in names)


def _wait_threads(probe, started: int, timeout: float = 20.0) -> tuple[int, int]:
    """Wait until ``started`` instance threads loaded and all of them ended."""
    deadline = time.monotonic() + timeout
    while _threads(probe) != (started, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _threads(probe)


def test_a_model_unregistered_while_a_scale_waits_or_loads_keeps_no_worker(srv, tmp_path):
    m = srv.management
    probe = tmp_path / "probe"
    probe.mkdir()
    handler_archive(srv.store, "slowload", SLOW_LOADING_HANDLER.format(probe=str(probe), load_s=LOAD_S))
    log_start = len(srv.log())

    # 1. the scale waits on the version's lock while the (asynchronous) register loads
    r = httpx.post(f"{m}/models", params={"url": "slowload.mar", "synchronous": "false"})
    assert r.status_code == 202, r.text
    r = httpx.put(f"{m}/models/slowload", params={"min_worker": "3", "synchronous": "false"})
    assert r.status_code == 202, r.text
    assert httpx.delete(f"{m}/models/slowload").status_code == 200
    assert _wait_threads(probe, 1) == (1, 1)  # the register's worker loaded, saw it was stopped, ended
    time.sleep(LOAD_S + 0.5)  # a scale that went on would have loaded its workers by now
    assert _threads(probe) == (1, 1)
    assert httpx.get(f"{m}/models/slowload").status_code == 404

    # 2. the scale's new workers are loading when the model is unregistered
    r = httpx.post(f"{m}/models", params={"url": "slowload.mar"}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.put(f"{m}/models/slowload", params={"min_worker": "3", "synchronous": "false"})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 10
    while len(httpx.get(f"{m}/models/slowload").json()[0]["workers"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.delete(f"{m}/models/slowload").status_code == 200
    assert _wait_threads(probe, 4) == (4, 4)
    assert httpx.get(f"{m}/models/slowload").status_code == 404

    # neither the register nor the scales count as failures, and the name serves again
    log = srv.log()[log_start:]
    assert "failed to load" not in log and "scaling model slowload to 3 workers failed" not in log, log
    r = httpx.post(f"{m}/models", params={"url": "slowload.mar"}, timeout=30)
    assert r.status_code == 200, r.text
    try:
        r = httpx.post(f"{srv.inference}/predictions/slowload", json={"a": 1}, timeout=10)
        assert r.status_code == 200 and r.text == "ok", r.text
        assert len(httpx.get(f"{m}/models/slowload").json()[0]["workers"]) == 1
    finally:
        assert httpx.delete(f"{m}/models/slowload").status_code == 200
    assert _wait_threads(probe, 5) == (5, 5)


# --- gRPC management: the same checks answer INVALID_ARGUMENT ----------------------------
def test_grpc_register_and_scale_refuse_bad_input_with_invalid_argument(srv, mgmt):
    grpc_refused(mgmt.RegisterModel, mpb.RegisterModelRequest(url="mlp.mar\x00x"), "url", "NUL")
    grpc_refused(mgmt.RegisterModel, mpb.RegisterModelRequest(url=URL_LONG), "url", "4096")
    grpc_refused(mgmt.RegisterModel, mpb.RegisterModelRequest(url="a" * 300), "not a usable path")
    grpc_refused(mgmt.RegisterModel, mpb.RegisterModelRequest(url="mlp.mar", model_name="g", initial_workers=2**31 - 1),
                 "initial_workers", str(CAP))
    grpc_refused(mgmt.RegisterModel, mpb.RegisterModelRequest(url="mlp.mar", model_name="g", batch_size=2**31 - 1),
                 "batch_size")
    grpc_refused(mgmt.RegisterModel, mpb.RegisterModelRequest(url="mlp.mar", model_name="g", response_timeout=-5),
                 "response_timeout")
    grpc_refused(mgmt.ScaleWorker, mpb.ScaleWorkerRequest(model_name="mlp", min_worker=2**31 - 1, max_worker=2**31 - 1),
                 "min_worker", str(CAP))
    with pytest.raises(grpc.RpcError) as info:  # TorchServe answers a negative min_worker 500: INTERNAL
        mgmt.ScaleWorker(mpb.ScaleWorkerRequest(model_name="mlp", min_worker=-3), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL and "min_worker" in info.value.details()
    described = mgmt.DescribeModel(mpb.DescribeModelRequest(model_name="mlp"), timeout=5)
    assert '"modelName": "mlp"' in described.msg
    assert "g" not in registered(srv)
    serves(srv)


# --- model-config.yaml values ------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("responseTimeout", math.nan), ("responseTimeout", math.inf), ("responseTimeout", "nan"),
    ("maxBatchDelay", -math.inf), ("batchSize", 2**70), ("batchSize", 2.5), ("jobQueueSize", 10**12),
    ("startupTimeout", 1e300), ("minWorkers", 65), ("maxWorkers", 10**12), ("clientTimeoutInMills", math.nan),
])
def test_model_config_refuses_non_finite_and_oversized_numbers_naming_them(key, value):
    with pytest.raises(OspreyError) as info:
        parse_model_config({key: value}, source="m.mar: model-config", worker_cap=64)
    assert info.value.kind is ErrorKind.BAD_INPUT and key in info.value.message


def test_model_config_keeps_legal_numbers():
    cfg = parse_model_config({"batchSize": "8", "maxBatchDelay": 5.5, "responseTimeout": 604800, "minWorkers": 2,
                              "maxWorkers": 100, "jobQueueSize": 1_000_000}, worker_cap=64)
    assert (cfg.batch_size, cfg.max_batch_delay_ms, cfg.response_timeout_s, cfg.min_workers, cfg.max_workers,
            cfg.job_queue_size) == (8, 5.5, 604800.0, 2, 100, 1_000_000)


def test_model_config_starts_at_most_the_cap():
    with pytest.raises(OspreyError) as info:
        parse_model_config({"minWorkers": 9, "maxWorkers": 100}, worker_cap=8)
    assert "minWorkers" in info.value.message and "max_workers_per_model" in info.value.message
    cfg = parse_model_config({}, default_workers=100, worker_cap=8)  # default_workers_per_model above the cap
    assert (cfg.min_workers, cfg.max_workers) == (8, 100)


# --- in process: starting workers --------------------------------------------------------
@pytest.fixture
async def registry_of(tmp_path):
    """A real Registry on this test's loop over a store holding mlp.mar; closed afterwards."""
    from server.core.registry import Registry
    from server.instances import thread_factory
    from server.settings import Settings

    store = tmp_path / "store"
    store.mkdir()
    mlp_archive(store, "mlp")
    made = []

    def make(**settings):
        reg = Registry(Settings(model_store=str(store), workdir=str(tmp_path), **settings), asyncio.get_running_loop(),
                       thread_factory())
        made.append(reg)
        return reg
    yield make
    for reg in made:
        await reg.close()


async def _ended(instances, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(i.ended for i in instances):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_worker_thread_that_cannot_start_leaves_nothing_running(registry_of, monkeypatch):
    """The thread limit ("can't start new thread") hit part-way through: the workers already
    started are stopped, nothing is registered, the error says what happened."""
    from server.instances import thread as runtime

    reg = registry_of()
    started = []
    real_start = runtime.ModelInstance.start

    def start(self):
        if len(started) == 2:
            raise RuntimeError("can't start new thread")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(runtime.ModelInstance, "start", start)
    with pytest.raises(OspreyError) as info:
        await reg.register("mlp.mar", initial_workers=4)
    assert info.value.kind is ErrorKind.UNAVAILABLE
    assert "could not start worker 3 of 4" in info.value.message and "can't start new thread" in info.value.message
    assert reg.models == {} and len(started) == 2
    assert await _ended(started)


async def test_concurrent_scale_ups_together_stay_within_the_cap(registry_of):
    reg = registry_of(max_workers_per_model=6)
    mv = await reg.register("mlp.mar")
    await asyncio.gather(*(reg.scale("mlp", None, 6, None) for _ in range(3)))
    assert len(mv.instances) == 6 and all(i.status == "READY" for i in mv.instances)
    with pytest.raises(OspreyError) as info:
        reg.plan_scale("mlp", None, 7, None)
    assert "min_worker" in info.value.message and "to 6 (the server's max_workers_per_model)" in info.value.message


# --- in process: the batcher always gets its instance back -------------------------------
class Instance:
    """Runs nothing: the test finishes batches by hand; ``refuse`` makes the next handoff raise."""

    status = "READY"

    def __init__(self):
        self.pending = []
        self.refuse: Exception | None = None

    def submit(self, batches, loop, on_done):
        if self.refuse is not None:
            exc, self.refuse = self.refuse, None
            raise exc
        self.pending.append((batches, on_done))

    def finish(self):
        batches, on_done = self.pending.pop(0)
        on_done(self, batches, [[InferenceResponse(body=r.request.request_id.encode()) for r in b] for b in batches])

    def stop(self):
        self.status = "STOPPED"


class Broken(Instance):
    """Every handoff raises (a broken instance that stays broken)."""

    def submit(self, batches, loop, on_done):
        raise RuntimeError("instance thread is gone")


def _req(i: int, deadline: float | None = None) -> Ticket:
    r = Ticket(InferenceRequest(model="m", version="1", request_id=f"r{i}", deadline=deadline))
    r.timings.received = time.monotonic()
    return r


def _batcher(**kw) -> tuple[Batcher, Instance]:
    b = Batcher("m", "1", batch_size=4, max_batch_delay_s=0.0, queue_size=10, loop=asyncio.get_running_loop(), **kw)
    inst = Instance()
    b.add_instance(inst)
    return b, inst


@pytest.mark.parametrize("deadline", [math.nan, math.inf, -math.inf])
async def test_a_deadline_that_is_no_time_is_refused_and_the_instance_stays_free(deadline):
    b, inst = _batcher()
    with pytest.raises(OspreyError) as info:
        b.submit(_req(0, deadline))
    assert info.value.kind is ErrorKind.BAD_INPUT and "deadline" in info.value.message
    assert b.pending == 0
    fut = b.submit(_req(1, time.monotonic() + 5))
    inst.finish()
    assert (await fut).body == b"r1"


async def test_a_handoff_that_raises_fails_only_its_batch_and_retires_that_instance():
    """An instance whose handoff raises (for ever, say) is stopped and gets no more batches;
    its batch gets a generic error, the other instance serves what comes next."""
    b, good = _batcher()
    first = b.submit(_req(0, time.monotonic() + 5))  # holds the good instance
    broken = Broken()
    b.add_instance(broken)
    second = b.submit(_req(1, time.monotonic() + 5))  # goes to the broken one
    assert second.done()
    with pytest.raises(OspreyError) as info:
        second.result()
    assert info.value.kind is ErrorKind.INTERNAL and "could not hand the batch to an instance" in info.value.message
    assert "instance thread is gone" not in info.value.message and broken.status == "STOPPED"
    later = [b.submit(_req(i, time.monotonic() + 5)) for i in (2, 3)]
    good.finish()
    assert (await first).body == b"r0"
    good.finish()
    assert [(await f).body for f in later] == [b"r2", b"r3"]


async def test_the_last_instance_failing_its_handoff_leaves_nothing_waiting():
    """Requests queued behind a failed handoff of the only instance are answered at once
    (503), not left to their deadline; new ones are refused until a worker is added."""
    b, inst = _batcher()
    first = b.submit(_req(0, time.monotonic() + 60))
    queued = [b.submit(_req(i, time.monotonic() + 60)) for i in range(1, 7)]  # batch 4: two batches wait
    inst.refuse = RuntimeError("instance thread is gone")
    inst.finish()  # the next handoff raises
    assert (await first).body == b"r0"
    kinds = []
    for f in queued:
        assert f.done()
        kinds.append(f.exception().kind)
    assert kinds == [ErrorKind.INTERNAL] * 4 + [ErrorKind.UNAVAILABLE] * 2
    with pytest.raises(OspreyError) as info:
        b.submit(_req(7, time.monotonic() + 5))
    assert info.value.kind is ErrorKind.UNAVAILABLE


async def test_a_failing_batch_observer_does_not_keep_the_instance_busy():
    def observer(batch):
        raise ValueError("metrics backend down")

    b, inst = _batcher(on_batch=observer)
    first = b.submit(_req(0))
    inst.finish()
    assert (await first).body == b"r0"
    second = b.submit(_req(1))
    inst.finish()
    assert (await second).body == b"r1"
