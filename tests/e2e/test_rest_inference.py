"""The TorchServe inference API against the real server process."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import time

import httpx
import pytest
import torch

from tests.gates import Gate, pending, wait_until
from tests.models import RECORDING_HANDLER, handler_archive, mlp_archive

ROW = [float(i) for i in range(16)]

STATUS_HANDLER = '''
from handlers import PredictionException
def handle(data, context):
    if data is None:
        return None
    body = data[0]["body"]
    if body.get("raise"):
        raise PredictionException("input rejected: field x is missing", 400)
    context.set_response_header(0, "X-Custom", "v1")
    context.set_response_content_type(0, "text/csv")
    return ["a,b\\n1,2\\n"]
'''

ECHO_HANDLER = '''
def handle(data, context):
    if data is None:
        return None
    out = []
    for i, row in enumerate(data):
        out.append({k: [type(v).__name__, v if isinstance(v, (str, dict, list)) else bytes(v).decode()]
                    for k, v in row.items()} | {"_url_path": context.get_request_header(i, "url_path"),
                                               "_explain": context.get_request_header(i, "explain")})
    return out
'''


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    mlp_archive(store, config={"batchSize": 8, "maxBatchDelay": 5})
    mlp_archive(store, "mlptgz", fmt="tgz")
    mlp_archive(store, "mlpdir", fmt="no-archive")
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 16, "maxBatchDelay": 50})
    handler_archive(store, "recfail", RECORDING_HANDLER, config={"batchSize": 8, "maxBatchDelay": 50})
    handler_archive(store, "recq", RECORDING_HANDLER, config={"batchSize": 1, "jobQueueSize": 2})
    handler_archive(store, "rect", RECORDING_HANDLER, config={"responseTimeout": 1})
    handler_archive(store, "st", STATUS_HANDLER)
    handler_archive(store, "echo", ECHO_HANDLER)
    handler_archive(store, "short", "def handle(data, context):\n    return [] if data else None\n")
    handler_archive(store, "big", "def handle(data, context):\n    return [bytes(range(256)) * 1200 for _ in data] if data else None\n")
    server = osprey_module(["all"], store)
    server.store = store
    return server


def direct_mlp(srv, rows):
    model = torch.jit.load(str(srv.store.parent / "build-mlp-1.0" / "mlp.pt"))
    with torch.inference_mode():
        return model(torch.tensor(rows)).tolist()


def test_prediction_equals_the_model_called_directly(srv, tmp_path):
    r = httpx.post(f"{srv.inference}/predictions/mlp", json=ROW)
    assert r.status_code == 200
    assert r.json() == pytest.approx(direct_mlp(srv, [ROW])[0], rel=1e-6)
    assert r.headers["x-request-id"]
    r2 = httpx.post(f"{srv.inference}/predictions/mlp/1.0", json=ROW)
    assert r2.json() == r.json() and r2.headers["x-request-id"] != r.headers["x-request-id"]
    assert httpx.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}


def test_curl_upload_with_put(srv, tmp_path):
    body = tmp_path / "row.json"
    body.write_text(json.dumps(ROW))
    out = subprocess.run(["curl", "-s", "-T", str(body), "-H", "Content-Type: application/json",
                          f"{srv.inference}/predictions/mlp"], capture_output=True, check=True, timeout=30)
    assert json.loads(out.stdout) == pytest.approx(direct_mlp(srv, [ROW])[0], rel=1e-6)


def test_concurrent_requests_share_one_forward_pass_and_are_never_mis_split(srv, tmp_path):
    n = 40
    gate = Gate(tmp_path)
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=n)) as client, \
            cf.ThreadPoolExecutor(n) as pool:
        def call(i):
            body = {"id": i, "gate": gate.value} if i == 0 else {"id": i}
            return i, client.post(f"{srv.inference}/predictions/rec", json=body)

        first = pool.submit(call, 0)  # holds the only instance while the rest queue up
        gate.wait_entered()
        rest = [pool.submit(call, i) for i in range(1, n)]
        wait_until(lambda: pending(srv, "rec") == n - 1, what=f"{n - 1} requests queued")
        gate.open()
        results = [first.result()] + [f.result() for f in rest]
    for i, r in results:
        assert r.status_code == 200
        assert r.json()["id"] == i  # each client gets exactly its own result
        assert r.json()["request_id"] == r.headers["x-request-id"]
    batch_sizes = [r.json()["batch"] for _, r in results]
    assert batch_sizes[0] == 1
    # the 39 queued left in batches of at most batchSize 16, the first one full
    assert max(batch_sizes[1:]) == 16 and min(batch_sizes[1:]) > 1


def test_handler_exception_fails_only_its_own_request(srv):

    def call(body):
        return httpx.post(f"{srv.inference}/predictions/recfail", json=body, timeout=30)

    with cf.ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(call, {"id": "slow", "sleep": 0.3})
        time.sleep(0.05)
        futs = [pool.submit(call, {"id": i, "fail": i == 3}) for i in range(6)]
        rs = [f.result() for f in futs]
    assert blocker.result().status_code == 200
    for i, r in enumerate(rs):
        if i == 3:
            assert r.status_code == 503
            assert r.json() == {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
        else:
            assert r.status_code == 200 and r.json()["id"] == i
    assert httpx.get(f"{srv.inference}/ping").status_code == 200  # still up


def test_handler_chosen_status_and_prediction_exception(srv):
    r = httpx.post(f"{srv.inference}/predictions/st", json={"raise": True})
    assert r.status_code == 400 and r.json()["message"] == "input rejected: field x is missing"
    assert r.json()["type"] == "InternalServerException"  # TorchServe's, whatever the handler's code
    r = httpx.post(f"{srv.inference}/predictions/st", json={})
    assert r.status_code == 200 and r.text == "a,b\n1,2\n"
    assert r.headers["content-type"] == "text/csv" and r.headers["x-custom"] == "v1"


def test_decode_input_request_false_hands_every_field_as_bytes(osprey, store):
    """TorchServe's decode_input_request=false: JSON and text reach the handler as the
    bytearray that came, for handlers that decode it themselves (they failed with 503)."""
    handler_archive(store, "echo", ECHO_HANDLER)
    raw = osprey(["echo=echo.mar"], store, config={"decode_input_request": "false"}, extra_args=["--no-grpc"])
    base = f"{raw.inference}/predictions/echo"
    assert httpx.post(base, json={"a": 1}).json()["body"] == ["bytearray", '{"a":1}']
    assert httpx.post(base, content="hi", headers={"content-type": "text/plain"}).json()["body"] == ["bytearray", "hi"]


def test_request_data_reaches_the_handler_as_torchserve_hands_it(srv):
    base = f"{srv.inference}/predictions/echo"
    assert httpx.post(base, json={"a": 1}).json()["body"] == ["dict", {"a": 1}]
    assert httpx.post(base, content="hi", headers={"content-type": "text/plain"}).json()["body"] == ["str", "hi"]
    assert httpx.post(base, content=b"\x01raw", headers={"content-type": "application/octet-stream"}).json()["body"][0] == "bytearray"
    assert httpx.post(base, content=b"{bad", headers={"content-type": "application/json"}).json()["body"] == ["bytearray", "{bad"]
    form = httpx.post(base, data={"a": "1", "b": "x"}).json()
    assert form["a"] == ["bytearray", "1"] and form["b"] == ["bytearray", "x"]
    multi = httpx.post(base, files={"data": ("d.bin", b"abc"), "f2": (None, "hello")}).json()
    assert multi["data"] == ["bytearray", "abc"] and multi["f2"] == ["bytearray", "hello"]
    extra = httpx.post(f"{base}/1.0/some/extra/path", json=1).json()
    assert extra["_url_path"] == "some/extra/path"
    assert httpx.post(f"{srv.inference}/explanations/echo", json=1).json()["_explain"] == "True"


def test_wrong_output_count_is_503_and_server_stays_up(srv):
    r = httpx.post(f"{srv.inference}/predictions/short", json=1)
    assert r.status_code == 503 and r.json()["message"] == "number of batch response mismatched"
    assert httpx.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}


def test_unknown_model_version_and_path(srv):
    r = httpx.post(f"{srv.inference}/predictions/nope", json=ROW)
    assert r.status_code == 404 and r.json() == {"code": 404, "type": "ModelNotFoundException",
                                                 "message": "Model not found: nope"}
    assert r.headers["x-request-id"]
    r = httpx.post(f"{srv.inference}/predictions/mlp/9.9", json=ROW)
    assert r.status_code == 404 and r.json()["type"] == "ModelVersionNotFoundException"
    r = httpx.get(f"{srv.inference}/nothing/here")
    assert r.status_code == 404 and r.json()["type"] == "ResourceNotFoundException"
    r = httpx.patch(f"{srv.inference}/ping")
    assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowedException"


def test_body_over_max_request_size_is_413(osprey, store):
    mlp_archive(store)
    srv = osprey(["mlp=mlp.mar"], store, config={"max_request_size": 1000})
    r = httpx.post(f"{srv.inference}/predictions/mlp", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000" in r.json()["message"]
    assert httpx.post(f"{srv.inference}/predictions/mlp", json=ROW).status_code == 200


def test_full_queue_answers_503_with_retry_after_and_loses_nothing_accepted(srv, tmp_path):
    gate = Gate(tmp_path)
    url = f"{srv.inference}/predictions/recq"  # batchSize 1, jobQueueSize 2
    with httpx.Client(timeout=30) as client, cf.ThreadPoolExecutor(4) as pool:
        busy = pool.submit(client.post, url, json={"id": 0, "gate": gate.value})
        gate.wait_entered()
        queued = [pool.submit(client.post, url, json={"id": i}) for i in (1, 2)]
        wait_until(lambda: pending(srv, "recq") == 2, what="two requests queued")
        refused = [client.post(url, json={"id": i}) for i in range(3, 6)]
        refused.append(client.post(url + "?x=1", json={"id": 6}))  # not the early path: the parser's
        v2 = client.post(f"{srv.inference}/v2/models/recq/infer", json={"inputs": []})
        before_body = _refused_before_body(srv, "/predictions/recq")
        gate.open()
        accepted = [busy.result()] + [f.result() for f in queued]
    for r in refused:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] and "queue is full" in r.json()["message"] and r.headers["x-request-id"]
    assert v2.status_code == 503 and "queue is full" in v2.json()["error"] and v2.headers["retry-after"]
    # refused as soon as the head arrived: the 10 MB body announced was never sent
    assert before_body[0] == 503 and b"queue is full" in before_body[1]
    assert [(r.status_code, r.json()["id"]) for r in accepted] == [(200, 0), (200, 1), (200, 2)]
    assert httpx.post(url, json={"id": 7}, timeout=30).status_code == 200  # room again
    metrics = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    rejected = [ln for ln in metrics.splitlines() if ln.startswith("osprey_requests_rejected_total") and 'model="recq"' in ln]
    assert rejected and float(rejected[0].rsplit(" ", 1)[1]) >= 6


def _refused_before_body(srv, path: str) -> tuple[int, bytes]:
    """POST a head announcing a large body, send none of it, read the answer."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(srv.inference)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 10000000\r\n\r\n".encode())
        (status, _, body), = _read_responses(s, 1)
    return status, body


def test_response_timeout_gives_504(srv):
    r = httpx.post(f"{srv.inference}/predictions/rect", json={"id": 1, "sleep": 2.5}, timeout=30)
    assert r.status_code == 504 and "timed out" in r.json()["message"]
    time.sleep(1.7)  # the overrunning handler keeps its thread until it returns
    r = httpx.post(f"{srv.inference}/predictions/rect", json={"id": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == 2


@pytest.mark.parametrize("name", ["mlptgz", "mlpdir"])
def test_tgz_and_folder_archives_are_served(srv, name):
    r = httpx.post(f"{srv.inference}/predictions/{name}", json=ROW)
    assert r.json() == pytest.approx(direct_mlp(srv, [ROW])[0], rel=1e-6)


def test_kserve_v1_predict_route(srv):
    r = httpx.post(f"{srv.inference}/v1/models/mlp:predict", json=ROW)
    assert r.status_code == 200 and len(r.json()) == 4


def _read_responses(sock, count: int) -> list[tuple[int, dict, bytes]]:
    """Read ``count`` complete HTTP/1.1 responses (Content-Length framed) from ``sock``."""
    buf, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        if status == 100:
            continue
        n = int(headers["content-length"])
        while len(buf) < n:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside a body"
            buf += chunk
        out.append((status, headers, buf[:n]))
        buf = buf[n:]
    return out


def test_raw_http_keep_alive_pipelining_and_expect_continue(srv):
    """Responses are whole HTTP/1.1 messages: pipelined requests answered in order on one
    connection, ``Expect: 100-continue`` honoured, errors framed like successes."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(srv.inference)
    rows = [[float(i + j) for j in range(16)] for i in range(3)]
    bodies = [json.dumps(r).encode() for r in rows]

    def req(path: str, body: bytes, extra: str = "") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body

    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(req("/predictions/mlp", bodies[0]) + req("/predictions/nope", b"{}") + req("/predictions/mlp", bodies[1]))
        answers = _read_responses(s, 3)
        assert [a[0] for a in answers] == [200, 404, 200]
        assert json.loads(answers[0][2]) == pytest.approx(direct_mlp(srv, [rows[0]])[0], abs=1e-5)
        assert json.loads(answers[2][2]) == pytest.approx(direct_mlp(srv, [rows[1]])[0], abs=1e-5)
        assert "x-request-id" in answers[1][1] and b"nope" in answers[1][2]

        head = req("/predictions/mlp", bodies[2], "Expect: 100-continue\r\n")[:-len(bodies[2])]
        s.sendall(head)  # headers only: the body waits for the server's 100 Continue
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(bodies[2])
        rest = first[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        if rest:  # never expected: the final answer cannot come before the body
            pytest.fail(f"answer before the body was sent: {rest[:80]!r}")
        (status, _, body), = _read_responses(s, 1)
        assert status == 200
        assert json.loads(body) == pytest.approx(direct_mlp(srv, [rows[2]])[0], abs=1e-5)


def test_large_responses_arrive_whole_on_a_kept_alive_connection(srv):
    """A 300 KB answer (header block and body sent as one vectored write) arrives intact,
    twice on the same connection."""
    expected = bytes(range(256)) * 1200
    with httpx.Client(timeout=30) as client:
        for _ in range(2):
            r = client.post(f"{srv.inference}/predictions/big", content=b"x")
            assert r.status_code == 200
            assert r.headers["content-length"] == str(len(expected))
            assert r.content == expected


def test_one_write_protocol_sends_each_response_in_one_write():
    """With the installed uvicorn, Osprey's protocol is in use and a response (status line,
    headers and body) reaches the transport as one write."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from server.protocols.rest.http_protocol import OneWriteHttpToolsProtocol, http_protocol

    assert issubclass(http_protocol(), OneWriteHttpToolsProtocol)

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    class Transport:
        def __init__(self):
            self.writes = []

        def write(self, data):
            self.writes.append(bytes(data))

        def get_extra_info(self, name, default=None):
            return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

        def is_closing(self):
            return False

        def close(self):
            pass

        def set_protocol(self, p):
            pass

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    async def main():
        config = uvicorn.Config(app, http=OneWriteHttpToolsProtocol, lifespan="off", log_level="warning")
        config.load()
        proto = OneWriteHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        t = Transport()
        proto.connection_made(t)
        proto.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        for _ in range(50):
            if t.writes:
                break
            await asyncio.sleep(0.01)
        proto.connection_lost(None)
        return t.writes

    writes = asyncio.run(main())
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nhello")


def test_cors_as_torchserve_configures_it(osprey, store):
    """cors_allowed_origin / _methods / _headers: an allowed Origin's answers carry
    Access-Control-Allow-Origin; a preflight is answered 200 with the methods and headers,
    before the token (a browser sends none with it); another Origin gets no CORS header."""
    handler_archive(store, "echo", ECHO_HANDLER)
    srv = osprey(["echo=echo.mar"], store, token_auth=True, extra_args=["--no-grpc"],
                 config={"cors_allowed_origin": "https://app.example", "cors_allowed_methods": "GET, POST",
                         "cors_allowed_headers": "Authorization, Content-Type"})
    key = srv.keys()["inference"]["key"]
    url = f"{srv.inference}/predictions/echo"
    pre = httpx.options(url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200, pre.text
    assert (pre.headers["access-control-allow-origin"], pre.headers["access-control-allow-methods"],
            pre.headers["access-control-allow-headers"]) == ("https://app.example", "GET, POST",
                                                             "Authorization, Content-Type")
    r = httpx.post(url, json={"a": 1}, headers={"Origin": "https://app.example", "Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.post(url, json={"a": 1}, headers={"Origin": "https://evil.example", "Authorization": f"Bearer {key}"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    denied = httpx.post(url, json={"a": 1}, headers={"Origin": "https://app.example"})  # no token: still refused
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"


def test_a_full_queue_refusal_carries_cors_for_an_allowed_origin(osprey, store, tmp_path):
    """A refusal answered from its head alone (queue full: 503 before the body is read) carries
    Access-Control-Allow-Origin like any other answer, so a browser client can read the 503 and
    its Retry-After instead of failing on CORS."""
    handler_archive(store, "recc", RECORDING_HANDLER, config={"batchSize": 1, "jobQueueSize": 1})
    srv = osprey(["recc=recc.mar"], store, extra_args=["--no-grpc"],
                 config={"cors_allowed_origin": "https://app.example"})
    url = f"{srv.inference}/predictions/recc"
    gate = Gate(tmp_path)
    with httpx.Client(timeout=30) as client, cf.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(client.post, url, json={"id": 0, "gate": gate.value})
        gate.wait_entered()
        queued = pool.submit(client.post, url, json={"id": 1})
        wait_until(lambda: pending(srv, "recc") == 1, what="one request queued")
        first = client.post(url, json={"id": 2}, headers={"Origin": "https://app.example"})  # opens the refusing window
        other = client.post(url, json={"id": 4}, headers={"Origin": "https://evil.example"})
        # a head announcing 10 MB that never come: only the refusal from the head can answer it
        import socket
        from urllib.parse import urlparse

        u = urlparse(srv.inference)
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(b"POST /predictions/recc HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n")
            (status, headers, body), = _read_responses(s, 1)
        gate.open()
        assert busy.result().status_code == 200 and queued.result().status_code == 200
    assert first.status_code == 503 and first.headers["retry-after"], first.text
    assert first.headers["access-control-allow-origin"] == "https://app.example" and first.headers["vary"] == "Origin"
    assert status == 503 and b"queue is full" in body
    assert headers["access-control-allow-origin"] == "https://app.example" and headers["vary"] == "Origin"
    assert other.status_code == 503 and "access-control-allow-origin" not in other.headers


def test_response_timeout_counts_from_dispatch_not_from_arrival(osprey, store):
    """responseTimeout 1 s, one instance, batches of one, each request running 0.4 s: five sent
    at once wait up to 1.6 s in the queue, and each runs well within its second. TorchServe
    counts the timeout from when its worker takes the job, and so does Osprey: all five are
    answered (the last two were 504 when the queue's wait counted)."""
    handler_archive(store, "slowq", RECORDING_HANDLER, config={"responseTimeout": 1, "batchSize": 1})
    srv = osprey(["slowq=slowq.mar"], store, extra_args=["--no-grpc"])
    url = f"{srv.inference}/predictions/slowq"

    def one(i: int) -> int:
        return httpx.post(url, json={"id": i, "sleep": 0.4}, timeout=60).status_code

    with cf.ThreadPoolExecutor(5) as pool:
        assert list(pool.map(one, range(5))) == [200] * 5
