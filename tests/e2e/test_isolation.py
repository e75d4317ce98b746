"""Process-isolated instances (``isolation: process``) and instance supervision, against real
server processes: a crashing child fails only what it ran (503 naming the crash) and comes
back; a crash loop marks the model unhealthy; a handler hung past responseTimeout answers 504
and is replaced (process killed, thread abandoned); process instances answer like thread ones.

Deterministic: batch-mates are lined up with a gate (tests/gates.py) and every wait is a
bounded poll on something the server shows (an answer, /ping, a metric, describe).
"""

from __future__ import annotations

import os
import re
import threading

import httpx
import numpy as np
import pytest

from server.core.model_config import parse_model_config
from server.core.errors import OspreyError
from tests.gates import Gate, pending, wait_until
from tests.models import handler_archive
from tests.oip_archives import ECHO_HANDLER, MLP_CONFIG, STREAM_HANDLER, _handler, tensor_mlp_archive

PROC = {"isolation": "process"}

# Echoes each request's "id"; crashes its process on {"crash": "exit"|"segv"}; honours "gate"
# and "hang" (seconds); counts calls in a handler metric; reports its pid.
CRASHY = '''
import ctypes, json, os, time

def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        body = row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body)
        if body.get("gate"):
            from tests.gates import hold
            hold(body["gate"])
        if body.get("hang"):
            time.sleep(body["hang"])
        if body.get("crash") == "exit":
            os._exit(1)
        if body.get("crash") == "segv":
            ctypes.string_at(0)
        out.append({"id": body.get("id"), "batch": len(data), "pid": os.getpid()})
    context.metrics.add_counter("IsolationCalls", len(data))
    return out
'''

# Crashes on request; every later start of the instance (a restart) crashes while loading.
LOOPER = '''
import os

def handle(data, context):
    marker = os.path.join(context.system_properties["model_dir"], "started-once")
    if data is None:
        if os.path.exists(marker):
            os._exit(3)
        open(marker, "w").close()
        return None
    os._exit(2)
'''


# Answers by what the body asks: a 422 with its own details, a torch tensor, or text; what an
# answer looks like depends on the API the request came by, in a child process as in a thread
BY_API = '''
import json
import torch

def handle(data, context):
    if data is None:
        return None
    out = []
    for i, row in enumerate(data):
        ask = bytes(row.get("body") or row.get("data") or b"").decode()
        if ask == "refuse":
            context.set_response_status(422, "Unprocessable", i)
            out.append({"why": "refused by the handler"})
        elif ask == "tensor":
            out.append(torch.arange(3, dtype=torch.float32))
        else:
            out.append("text:" + ask)
    return out
'''


def _post(srv, model: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{srv.inference}/predictions/{model}", json=body, timeout=timeout)


def _metric(srv, name: str, model: str) -> float:
    text = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'"{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _describe(srv, model: str) -> dict:
    return httpx.get(f"{srv.management}/models/{model}", timeout=30).json()[0]


def _comes_back(srv, model: str) -> dict:
    """The next request after a crash is answered 200 within seconds (bounded poll)."""
    answers = []

    def ok() -> bool:
        r = _post(srv, model, {"id": "after"})
        answers.append(r)
        assert r.status_code in (200, 503, 504), r.text
        return r.status_code == 200
    wait_until(ok, 30, f"{model} to answer again")
    return answers[-1].json()


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    handler_archive(store, "crashy", CRASHY, config={**PROC, "batchSize": 4, "maxBatchDelay": 1})
    handler_archive(store, "echo_thread", ECHO_HANDLER, config={"isolation": "thread"})
    handler_archive(store, "echo_proc", ECHO_HANDLER, config=PROC)
    tensor_mlp_archive(store, "tmlp_thread", MLP_CONFIG)
    tensor_mlp_archive(store, "tmlp_proc", {**MLP_CONFIG, **PROC})
    _handler(store, "streamer_proc", STREAM_HANDLER, PROC)
    handler_archive(store, "byapi_thread", BY_API, config={"isolation": "thread"})
    handler_archive(store, "byapi_proc", BY_API, config=PROC)
    server = osprey_module(["crashy.mar", "echo_thread.mar", "echo_proc.mar", "tmlp_thread.mar", "tmlp_proc.mar",
                            "streamer_proc.mar", "byapi_thread.mar", "byapi_proc.mar"], store)
    server.store = store
    return server


def test_isolation_is_parsed_and_a_bad_value_names_the_key():
    assert parse_model_config({}).isolation is None
    assert parse_model_config({"isolation": "process"}).isolation == "process"
    with pytest.raises(OspreyError, match="isolation must be thread or process"):
        parse_model_config({"isolation": "container"})


def test_the_server_default_is_thread_and_a_bad_one_names_the_setting():
    from server.settings import load_settings

    assert load_settings(env={}).instance_isolation == "thread"
    assert load_settings(env={"OSPREY_INSTANCE_ISOLATION": "process"}).instance_isolation == "process"
    with pytest.raises(ValueError, match="instance_isolation"):
        load_settings(env={}, overrides={"instance_isolation": "vm"})


def test_a_bad_isolation_value_is_refused_at_registration(srv):
    handler_archive(srv.store, "bad_iso", ECHO_HANDLER, config={"isolation": "vm"})
    r = httpx.post(f"{srv.management}/models", params={"url": "bad_iso.mar"}, timeout=60)
    assert r.status_code == 400 and "isolation" in r.text


def test_process_instances_run_in_their_own_process(srv):
    d = _describe(srv, "crashy")
    assert d["isolation"] == "process" and d["healthy"] is True
    assert d["workers"][0]["pid"] != srv.proc.pid
    assert _post(srv, "crashy", {"id": 1}).json()["pid"] == d["workers"][0]["pid"]
    assert _describe(srv, "echo_thread")["workers"][0]["pid"] == srv.proc.pid


def test_a_process_model_that_served_scales_down_and_unregisters_and_its_process_ends(osprey, store, tmp_path):
    """Under a TMPDIR too long for a Unix socket's path (a CI job's private one), too: the fork
    server's socket goes to a short folder."""
    handler_archive(store, "gone", CRASHY, config=PROC)
    long_tmp = tmp_path / ("t" * 40) / ("m" * 40)
    long_tmp.mkdir(parents=True)
    assert len(str(long_tmp)) + len("/pymp-xxxxxxxx/listener-xxxxxxxx") > 107
    srv = osprey([], store, env={"TMPDIR": str(long_tmp)})
    m = srv.management
    assert httpx.post(f"{m}/models", params={"url": "gone.mar", "initial_workers": 2}, timeout=120).status_code == 200
    pids = {_post(srv, "gone", {"id": i}).json()["pid"] for i in range(4)}
    assert pids and srv.proc.pid not in pids
    workers = {w["pid"] for w in _describe(srv, "gone")["workers"]}
    assert httpx.put(f"{m}/models/gone", params={"min_worker": 1, "synchronous": "true"}, timeout=60).status_code == 200
    assert _post(srv, "gone", {"id": "after scale"}).status_code == 200
    assert httpx.delete(f"{m}/models/gone", timeout=60).status_code == 200
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and "zombie" not in _state(p) for p in workers),
               30, "the instance processes to end")
    assert httpx.get(f"{srv.inference}/ping", timeout=30).status_code == 200
    wait_until(lambda: "event=model_released model=gone version=1.0" in srv.log(), 30, "the release")


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.parametrize("crash, named", [("exit", "exit status 1"), ("segv", "SIGSEGV")])
def test_a_crash_fails_only_its_batch_and_the_instance_comes_back(srv, tmp_path, crash, named):
    restarts = _metric(srv, "osprey_instance_restarts_total", "crashy")
    gate = Gate(tmp_path)
    answers: dict[str, httpx.Response] = {}

    def send(key, body):
        answers[key] = _post(srv, "crashy", body)

    first = threading.Thread(target=send, args=("held", {"id": "held", "gate": gate.value}))
    first.start()
    gate.wait_entered()
    mates = [threading.Thread(target=send, args=(k, b)) for k, b in
             (("crash", {"id": "crash", "crash": crash}), ("mate", {"id": "mate"}))]
    for t in mates:
        t.start()
    wait_until(lambda: pending(srv, "crashy") == 2, what="two requests queued behind the gate")
    gate.open()
    for t in (first, *mates):
        t.join(60)
    assert answers["held"].status_code == 200  # ran before the crash, in the same process
    crashed = answers["crash"]
    assert crashed.status_code == 503 and named in crashed.json()["message"], crashed.text
    # its batch-mate shared the process that died: answered (503 naming the crash), not hung
    assert answers["mate"].status_code == 503 and named in answers["mate"].json()["message"]
    after = _comes_back(srv, "crashy")
    assert after["pid"] != answers["held"].json()["pid"]  # a fresh process
    wait_until(lambda: _metric(srv, "osprey_instance_restarts_total", "crashy") == restarts + 1,
               what="the restart to be counted")
    assert httpx.get(f"{srv.inference}/ping", timeout=30).status_code == 200
    assert re.search(rf"event=instance_crashed model=crashy version=1.0 index=0 pid=\d+ reason=.*{named}", srv.log())
    assert "event=instance_restarted model=crashy version=1.0 index=0" in srv.log()


def test_process_and_thread_instances_give_the_same_answers(srv):
    # bytes handler over TorchServe's API, a body over 1 MB (the shared-memory path)
    big = (b"abcdefghij" * 150_000)
    for body in (b"small body", big):
        got = [httpx.post(f"{srv.inference}/predictions/{m}", content=body, timeout=60) for m in ("echo_thread", "echo_proc")]
        assert [r.status_code for r in got] == [200, 200]
        assert got[0].content == got[1].content == body.upper()
    # built-in tensor handler over OIP (REST v2): small and > 1 MB tensors
    rng = np.random.default_rng(0)
    for rows in (3, 17_000):
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        req = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [rows, 16], "data": x.ravel().tolist()}]}
        outs = []
        for m in ("tmlp_thread", "tmlp_proc"):
            r = httpx.post(f"{srv.inference}/v2/models/{m}/infer", json=req, timeout=120)
            assert r.status_code == 200, r.text
            out = r.json()["outputs"][0]
            assert out["shape"] == [rows, 4]
            outs.append(np.asarray(out["data"], dtype=np.float32))
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    meta = [httpx.get(f"{srv.inference}/v2/models/{m}", timeout=30).json() for m in ("tmlp_thread", "tmlp_proc")]
    assert meta[0]["inputs"] == meta[1]["inputs"] and meta[0]["outputs"] == meta[1]["outputs"]
    # what the loaded model is made of is reported across the boundary too (parameter dtype)
    text = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    for m in ("tmlp_thread", "tmlp_proc"):
        assert any(line.startswith("osprey_model_info{") and f'model="{m}"' in line and 'precision="fp32"' in line
                   for line in text.splitlines()), m


def test_a_child_process_answers_each_api_in_its_own_shape(srv):
    """The child knows which API a request came by: a handler's refusal, a torch tensor or text
    is answered as a thread instance answers it, on TorchServe's API and on the Open
    Inference Protocol alike."""
    def ask(model: str, what: str) -> list:
        ts = httpx.post(f"{srv.inference}/predictions/{model}", content=what.encode(), timeout=30)
        oip = httpx.post(f"{srv.inference}/v2/models/{model}/infer", timeout=30, json={"inputs": [
            {"name": "body", "datatype": "BYTES", "shape": [1], "data": [what]}]})
        return [(r.status_code, r.headers["content-type"], r.content if r is ts else
                 {k: v for k, v in r.json().items() if k not in ("id", "model_name")}) for r in (ts, oip)]

    for what in ("refuse", "tensor", "hello"):
        thread, proc = ask("byapi_thread", what), ask("byapi_proc", what)
        assert thread == proc, (what, thread, proc)
    ts, oip = ask("byapi_proc", "refuse")
    assert ts == (422, "application/json", b'{"why":"refused by the handler"}') and oip[0] == 422, (ts, oip)


def test_handler_metrics_and_timings_cross_the_process_boundary(srv):
    before = _metric(srv, "IsolationCalls", "crashy")
    assert _post(srv, "crashy", {"id": "m"}).status_code == 200
    wait_until(lambda: _metric(srv, "IsolationCalls", "crashy") >= before + 1, what="the handler's metric")
    # the batch's handler time is measured in the child and recorded by the parent
    assert _metric(srv, "osprey_stage_duration_seconds_count", "crashy") > 0


def test_streaming_intermediate_responses_cross_the_process_boundary(srv):
    pytest.importorskip("ts", reason="the streaming handler uses TorchServe's send_intermediate_predict_response")
    import grpc

    from server.protocols.grpc.generated import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(srv.grpc) as ch:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(ch)
        parts = [r.prediction for r in stub.StreamPredictions(
            inference_pb2.PredictionsRequest(model_name="streamer_proc", input={"body": b"abc"}), timeout=60)]
    assert parts == [b"part0:abc", b"part1:abc", b"part2:abc", b"done:abc"]


def test_a_crash_loop_marks_the_model_unhealthy(osprey, store):
    handler_archive(store, "looper", LOOPER, config=PROC)
    handler_archive(store, "fine", ECHO_HANDLER, config=PROC)
    srv = osprey(["looper.mar", "fine.mar"], store,
                 config={"crash_loop_restarts": 3, "crash_loop_window": 60, "instance_restart_backoff": 0.05})
    assert httpx.get(f"{srv.inference}/ping", timeout=30).status_code == 200
    r = _post(srv, "looper", {"x": 1})
    assert r.status_code == 503 and "exit status 2" in r.json()["message"]
    # each restart dies while loading (exit status 3): the third crash within the window stops it
    wait_until(lambda: _describe(srv, "looper")["healthy"] is False, 30, "the crash loop to be declared")
    assert httpx.get(f"{srv.inference}/ping", timeout=30).status_code == 500
    assert httpx.get(f"{srv.inference}/v2/health/ready", timeout=30).json()["ready"] is False
    assert httpx.get(f"{srv.inference}/v2/models/looper/ready", timeout=30).json()["ready"] is False
    assert httpx.get(f"{srv.inference}/v2/models/fine/ready", timeout=30).json()["ready"] is True
    d = _describe(srv, "looper")
    assert d["healthy"] is False and "crash loop" in d["unhealthyReason"]
    r = _post(srv, "looper", {"x": 1})
    assert r.status_code == 503
    assert httpx.post(f"{srv.inference}/predictions/fine", content=b"ok", timeout=30).content == b"OK"
    assert _metric(srv, "osprey_model_healthy", "looper") == 0
    assert "crash loop" in srv.log()


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_hung_handler_answers_504_and_a_fresh_instance_serves_the_next_request(osprey, store, kind):
    handler_archive(store, "hanger", CRASHY, config={"isolation": kind, "responseTimeout": 1})
    srv = osprey(["hanger.mar"], store, config={"hang_grace": 0.5})
    first = _post(srv, "hanger", {"id": "warm"}).json()
    r = _post(srv, "hanger", {"id": "hung", "hang": 20})
    assert r.status_code == 504, r.text
    after = _comes_back(srv, "hanger")  # a fresh instance serves (early tries may time out in the queue)
    if kind == "process":
        assert after["pid"] != first["pid"]
        assert "event=instance_hung model=hanger version=1.0 index=0 " in srv.log() and "action=killed" in srv.log()
        wait_until(lambda: _metric(srv, "osprey_instance_restarts_total", "hanger") == 1, what="the restart count")
    else:
        assert "event=instance_hung model=hanger version=1.0 index=0 " in srv.log() and "action=abandoned" in srv.log()
        assert _metric(srv, "osprey_instances_abandoned_total", "hanger") == 1
    assert httpx.get(f"{srv.inference}/ping", timeout=30).status_code == 200


def test_torchserve_lifecycle_answers_worker_died_and_logs_torchserves_recovery_lines(osprey, store):
    """worker_lifecycle=torchserve (what `osprey torchserve` sets): a request past responseTimeout
    is answered as TorchServe answers it and the replacement is logged in its frontend's words
    (TorchServe's test_auto_recover waits for them; operators grep 'Worker disconnected'). A thread
    instance, the default (a process one takes the same route: killed, then lost)."""
    handler_archive(store, "hanger", CRASHY, config={"isolation": "thread", "responseTimeout": 1})
    srv = osprey(["hanger.mar"], store, config={"hang_grace": 0, "worker_lifecycle": "torchserve"})
    _post(srv, "hanger", {"id": "warm"})
    r = _post(srv, "hanger", {"id": "hung", "hang": 20})
    assert (r.status_code, r.json()) == (500, {"code": 500, "type": "InternalServerException",
                                               "message": "Worker died."})
    wait_until(lambda: "Auto recovery succeeded, reset recoveryStartTS" in srv.log(), 30, "the recovery line")
    log = srv.log()
    wanted = [r"ERROR \S+: Number or consecutive unsuccessful inference 1\n",
              r"INFO \S+: \d+ Worker disconnected\. WORKER_MODEL_LOADED\n",
              r"INFO \S+: Auto recovery start timestamp: \d{13}\n",
              r"INFO \S+: Retry worker: \d+ in [\d.]+ seconds\.\n",
              r"INFO \S+: Auto recovery succeeded, reset recoveryStartTS\n"]
    at = [re.search(w, log) for w in wanted]
    assert all(at), [w for w, m in zip(wanted, at) if m is None]
    assert [m.start() for m in at] == sorted(m.start() for m in at)  # in TorchServe's order
    assert "event=instance_hung" not in log and "event=instance_restart" not in log
    assert "Auto recovery failed again" not in log
    assert _comes_back(srv, "hanger")["id"] == "after"


# --- the boundary itself, in this process --------------------------------------------------
def test_payloads_round_trip_through_an_arena_or_the_pipe():
    from server.instances.wire import SHM_MIN, Arena, pack_bytes, pack_tensors, unpack_bytes, unpack_tensors

    arena = Arena.create(1 << 20)
    try:
        big = np.arange(SHM_MIN, dtype=np.float32).reshape(-1, 16)[:, ::2]  # not contiguous
        obj = np.array([b"a", b"bc"], dtype=object)
        packed = pack_tensors({"big": big, "obj": obj, "small": np.ones(3, np.int64)}, arena)
        assert packed["big"][0] == "nd" and packed["obj"] is obj  # object arrays are pickled
        back = unpack_tensors(packed, arena)
        np.testing.assert_array_equal(back["big"], big)
        assert back["big"].dtype == big.dtype and list(back["obj"]) == [b"a", b"bc"]
        body = os.urandom(SHM_MIN)
        ref = pack_bytes(body, arena)
        assert ref[0] == "shm" and unpack_bytes(ref, arena) == body
        assert pack_bytes(os.urandom(2 << 20), arena)[0] != "shm"  # too large for this arena: pickled
        assert pack_bytes(b"tiny", arena) == b"tiny"
    finally:
        arena.close(unlink=True)


def test_a_handoff_larger_than_the_arena_grows_it(tmp_path):
    import asyncio

    from server.core.archive import open_archive
    from server.core.model_config import ModelConfig
    from server.core.types import Field, InferenceRequest, Ticket
    from server.instances.process import IN_ARENA, ProcessInstance

    store = tmp_path / "store"
    store.mkdir()
    archive = open_archive(handler_archive(store, "echo", ECHO_HANDLER), tmp_path / "work")
    inst = ProcessInstance("echo", "1.0", archive, ModelConfig(batch_size=4, device_type="cpu"), 0, None)
    bodies = [bytes([65 + i]) * (IN_ARENA // 2 + 1) for i in range(3)] + [b"small"]

    async def main():
        inst.start()
        await inst.wait_loaded(120)
        loop = asyncio.get_running_loop()
        answers = []
        for batch in ([bodies[:3]], [bodies[3:]]):
            done = loop.create_future()
            reqs = [[Ticket(InferenceRequest(model="echo", version="1.0", request_id=str(i), fields={"body": Field(b)}))
                     for i, b in enumerate(batch[0])]]
            inst.submit(reqs, loop, lambda _i, _b, outcomes: done.set_result(outcomes))
            answers.append(await asyncio.wait_for(done, 120))
            assert all(r.timings.finished >= r.timings.started > 0 for r in reqs[0])
        inst.stop()
        return answers

    try:
        first, second = asyncio.run(main())
    finally:
        inst.kill()
    assert [o.body for o in first[0]] == [b.upper() for b in bodies[:3]]
    assert [o.body for o in second[0]] == [b"SMALL"]
    archive.cleanup()


def test_unregistering_while_a_crashed_instance_waits_to_restart_answers_what_was_queued(osprey, store):
    """The instance crashed and its restart waits out the backoff; requests queue for it; the
    version is unregistered meanwhile. As the README promises for unregister, what was queued is
    answered first: the instance is restarted for it, then stopped (every queued request failed
    'restart failed')."""
    handler_archive(store, "crashq", CRASHY, config={**PROC, "batchSize": 1, "jobQueueSize": 100})
    srv = osprey(["crashq=crashq.mar"], store, config={"instance_restart_backoff": 4}, extra_args=["--no-grpc"])
    url = f"{srv.inference}/predictions/crashq"
    assert httpx.post(url, json={"crash": "exit"}, timeout=60).status_code == 503
    answers: dict[str, httpx.Response] = {}

    def send(i: int) -> None:
        answers[f"q{i}"] = httpx.post(url, json={"id": f"q{i}"}, timeout=120)

    queued = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in queued:
        t.start()
    wait_until(lambda: pending(srv, "crashq") == 3, what="three requests queued for the restarting instance")
    gone = httpx.delete(f"{srv.management}/models/crashq", timeout=120)
    for t in queued:
        t.join(120)
    assert gone.status_code == 200, gone.text
    assert {k: (r.status_code, r.json().get("id")) for k, r in answers.items()} == {
        f"q{i}": (200, f"q{i}") for i in range(3)}, {k: r.text for k, r in answers.items()}
    assert re.search(r"event=model_unregistered model=crashq version=1\.0 drained=3 failed=0", srv.log()), srv.log()
