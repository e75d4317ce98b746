"""Several front-end processes on the inference port (setting ``frontends``), end to end.

A real server with ``frontends=3``: two front-end processes beside it share the inference port
(SO_REUSEPORT) and relay every request to the server. Which process a connection landed on is
read from the kernel (the process holding the accepted socket), so each test knows that its
requests really crossed a front end, and that the server's own connections still work.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading

import psutil
import pytest

from tests.gates import Gate, alive, pending, wait_for, wait_until
from tests.models import RECORDING_HANDLER, handler_archive
from tests.prometheus_helpers import sample_value

pytestmark = pytest.mark.skipif(not hasattr(__import__("socket"), "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


def frontend_pids(srv) -> list[int]:
    out = []
    for child in psutil.Process(srv.proc.pid).children():
        try:
            if "server.frontends.child" in " ".join(child.cmdline()):
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(out)


def served_by(srv, conn: http.client.HTTPConnection) -> int | None:
    """The pid of the process that accepted ``conn`` (None while it waits in a backlog)."""
    mine = conn.sock.getsockname()[1]
    for pid in [srv.proc.pid, *frontend_pids(srv)]:
        try:
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.laddr and c.raddr and c.laddr.port == srv.ports["inference"] and c.raddr.port == mine:
                    return pid
        except psutil.NoSuchProcess:
            pass
    return None


def connection(srv, where: str, exclude: tuple = ()) -> tuple[http.client.HTTPConnection, int]:
    """A kept-alive connection accepted by the server itself (``where="server"``) or by a front
    end (``"frontend"``): connections are opened until the kernel hands one to such a process
    (each lands on one of the 3 listeners; hundreds of misses in a row do not happen)."""
    port = srv.ports["inference"]
    for _ in range(300):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        pid = wait_for(lambda: served_by(srv, conn), 30, "the connection to be accepted")
        if (pid == srv.proc.pid) == (where == "server") and pid not in exclude:
            return conn, pid
        conn.close()
    raise AssertionError(f"no connection landed on the {where}")


def post(conn: http.client.HTTPConnection, path: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def test_requests_from_front_ends_and_the_server_share_one_batch(osprey, store, tmp_path):
    """While the instance is held busy, one request the server read itself and one a front end
    relayed wait in the model's queue: they come out as one batch of 2, so there is one queue
    whichever process took the connection."""
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 2, "maxBatchDelay": 1000})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 3})
    assert len(frontend_pids(srv)) == 2
    busy, _ = connection(srv, "frontend")
    own, _ = connection(srv, "server")
    relayed, _ = connection(srv, "frontend")
    gate = Gate(tmp_path)
    answers = {}

    def send(name, conn, body):
        answers[name] = post(conn, "/predictions/rec", body)

    held = threading.Thread(target=send, args=("busy", busy, {"id": "busy", "gate": gate.value}))
    held.start()
    gate.wait_entered()
    threads = [threading.Thread(target=send, args=(n, c, {"id": n})) for n, c in (("own", own), ("relayed", relayed))]
    for t in threads:
        t.start()
    wait_until(lambda: pending(srv, "rec") == 2, what="both requests to be queued")
    gate.open()
    for t in (held, *threads):
        t.join(60)
    for name in ("own", "relayed"):
        status, headers, body = answers[name]
        assert status == 200, body
        out = json.loads(body)
        assert out["id"] == name and out["batch"] == 2
        assert headers["x-request-id"] == out["request_id"]  # the id the client sees is the handler's
    assert answers["own"][1]["x-request-id"] != answers["relayed"][1]["x-request-id"]
    # the front end's connection is kept alive and goes on serving
    status, _, body = post(relayed, "/predictions/rec", {"id": "again"})
    assert status == 200 and json.loads(body)["id"] == "again"


def test_every_route_and_error_works_through_a_front_end(osprey, store):
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 3, "max_request_size": 4096})
    conn, _ = connection(srv, "frontend")
    conn.request("GET", "/ping")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"status": "Healthy"}
    conn.request("GET", "/v2/health/ready")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    status, _, body = post(conn, "/predictions/nope", {"id": 1})
    assert status == 404 and json.loads(body)["message"] == "Model not found: nope"
    status, _, body = post(conn, "/predictions/rec", {"status": 429, "id": 2})  # the handler's own status
    assert status == 429
    status, _, body = post(conn, "/predictions/rec", {"id": 3})
    assert status == 200 and json.loads(body)["id"] == 3
    # a body past max_request_size: the server's own 413, naming the limit
    status, _, body = post(conn, "/predictions/rec", b"x" * 5000)
    assert status == 413 and b"max_request_size" in body
    # the server counted what the front end relayed (its metrics, its access log)
    import httpx

    metrics = httpx.get(f"{srv.metrics}/metrics", timeout=30).text
    line = next(x for x in metrics.splitlines() if x.startswith("ts_inference_requests_total") and 'model_name="rec"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= 2


@pytest.mark.parametrize("where", ["server", "frontend"])
def test_a_chunked_body_past_the_limit_is_413_in_one_write_or_several(osprey, store, where):
    """Without a Content-Length the limit is counted as the body arrives, whichever process reads
    it: 6 KiB over a 4 KiB max_request_size is refused, sent in one write (it used to pass when
    it arrived in one read) or in three."""
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 3, "max_request_size": 4096})
    for parts in (1, 3):
        conn, _ = connection(srv, where)
        conn.putrequest("POST", "/predictions/rec")
        conn.putheader("content-type", "application/json")
        conn.putheader("transfer-encoding", "chunked")
        conn.endheaders()
        chunks = [b"800\r\n" + b"x" * 0x800 + b"\r\n" for _ in range(3)] + [b"0\r\n\r\n"]
        if parts == 1:
            conn.send(b"".join(chunks))
        else:
            for c in chunks:
                conn.send(c)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 413 and b"max_request_size" in body, (parts, resp.status, body)
        conn.close()


def test_sigterm_drains_requests_a_front_end_relayed(osprey, store, tmp_path):
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1, "maxBatchDelay": 1})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 3, "drain_timeout": 30})
    fronts = frontend_pids(srv)
    gated, _ = connection(srv, "frontend")
    queued, _ = connection(srv, "frontend")
    gate = Gate(tmp_path)
    answers = {}
    t1 = threading.Thread(target=lambda: answers.__setitem__("gated", post(gated, "/predictions/rec",
                                                                             {"id": "g", "gate": gate.value})))
    t1.start()
    gate.wait_entered()
    t2 = threading.Thread(target=lambda: answers.__setitem__("queued", post(queued, "/predictions/rec", {"id": "q"})))
    t2.start()
    wait_until(lambda: pending(srv, "rec") == 1, what="the second request to be queued")
    srv.proc.send_signal(signal.SIGTERM)
    # the server and both front ends have begun to drain (their connections answer Connection: close)
    wait_until(lambda: "drain_started" in srv.log() and srv.log().count("event=frontend_draining") == 2,
               what="the drain to begin everywhere")
    gate.open()
    t1.join(60)
    t2.join(60)
    for name, want in (("gated", "g"), ("queued", "q")):
        status, headers, body = answers[name]
        assert status == 200 and json.loads(body)["id"] == want
        assert headers.get("connection") == "close"  # the front end drained its connection too
    assert srv.proc.wait(30) == 0
    wait_until(lambda: not any(alive(p) for p in fronts), what="the front ends to exit")


def test_a_front_end_that_dies_is_started_again(osprey, store):
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 3})
    own, _ = connection(srv, "server")
    victim_conn, victim = connection(srv, "frontend")
    assert sample_value(srv.metrics, "osprey_frontends_up") == 2
    assert sample_value(srv.metrics, "osprey_frontend_restarts_total") == 0
    # the server's connection and the front end's, as of its last heartbeat (every second)
    wait_until(lambda: sample_value(srv.metrics, "osprey_connections_open", port="inference") >= 2,
               what="the front end's connection counted")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "event=frontend_restarted" in srv.log(), what="the front end to be started again")
    assert sample_value(srv.metrics, "osprey_frontend_restarts_total") == 1
    assert sample_value(srv.metrics, "osprey_frontends_up") == 2
    now = frontend_pids(srv)
    assert len(now) == 2 and victim not in now
    assert "event=frontend_exited" in srv.log() and "code=-9" in srv.log()
    # the server's own connection never noticed; a new connection reaches the new front end
    assert post(own, "/predictions/rec", {"id": "own"})[0] == 200
    conn, pid = connection(srv, "frontend")
    assert pid != victim
    status, _, body = post(conn, "/predictions/rec", {"id": "new"})
    assert status == 200 and json.loads(body)["id"] == "new"


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_frontends_setting_is_refused_naming_it(osprey, store, value):
    with pytest.raises(RuntimeError) as info:
        osprey([], store, config={"frontends": value})
    assert "frontends" in str(info.value)


def test_a_streamed_answer_comes_through_a_front_end_in_chunks(osprey, store):
    """A handler's intermediate responses reach a client of a front end as the chunks of one
    answer, in order, then the final answer as the last chunk (as on the server's own port)."""
    pytest.importorskip("ts", reason="the streaming handler uses TorchServe's send_intermediate_predict_response")
    from tests.oip_archives import STREAM_HANDLER

    handler_archive(store, "streamer", STREAM_HANDLER, config={"batchSize": 1})
    srv = osprey(["streamer=streamer.mar"], store, config={"frontends": 3})
    for where in ("frontend", "server"):
        conn, _ = connection(srv, where)
        conn.request("POST", "/predictions/streamer", body=b"abc", headers={"content-type": "application/octet-stream"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked", resp.read()
        assert resp.getheader("x-request-id")
        chunks = []
        while True:
            line = resp.fp.readline()
            size = int(line.strip(), 16)
            if size == 0:
                resp.fp.readline()
                break
            chunks.append(resp.fp.read(size))
            resp.fp.readline()
        assert [c.decode() for c in chunks] == ["part0:abc", "part1:abc", "part2:abc", "done:abc"], where
        conn.close()


def test_https_through_front_ends_and_sighup_renews_their_certificate(osprey, store, tmp_path):
    """With an https inference address the front ends serve TLS with the server's key and
    certificate, and SIGHUP to the server renews the certificate in every front end too."""
    import shutil
    import ssl

    from tests.e2e.test_tls import make_pki
    from tests.oip_archives import echo_archive

    pki = make_pki(tmp_path / "pki")
    echo_archive(store)
    srv = osprey(["echo=echo.mar"], store, scheme="https",
                 config={"frontends": 3, "private_key_file": pki["key"], "certificate_file": pki["cert"]})

    def https(ca, where, exclude=()):
        ctx = ssl.create_default_context(cafile=str(ca))
        for _ in range(300):
            conn = http.client.HTTPSConnection("127.0.0.1", srv.ports["inference"], timeout=60, context=ctx)
            conn.connect()
            pid = wait_for(lambda: served_by(srv, conn), 30, "the connection to be accepted")
            if (pid == srv.proc.pid) == (where == "server") and pid not in exclude:
                return conn
            conn.close()
        raise AssertionError(f"no connection landed on the {where}")

    conn = https(pki["ca"], "frontend")
    status, _, body = post(conn, "/predictions/echo", b"over tls")
    assert status == 200 and body == b"OVER TLS"
    new = make_pki(tmp_path / "new", "renewed")
    shutil.copy(new["key"], pki["key"])
    shutil.copy(new["cert"], pki["cert"])
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: srv.log().count("TLS reloaded") >= 3, what="the server and both front ends to reload")
    conn = https(new["ca"], "frontend")  # a new connection to a front end: the renewed certificate
    assert post(conn, "/predictions/echo", b"renewed")[0] == 200


def test_token_auth_through_a_front_end_and_no_secret_on_its_command_line(osprey, store):
    """The inference token is checked for relayed requests as for the server's own; and the
    front ends get their settings through the socket pair: their command lines, which every user
    of the machine can read, hold neither the settings nor the key."""
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1})
    srv = osprey(["rec=rec.mar"], store, token_auth=True, config={"frontends": 3})
    key = srv.keys()["inference"]["key"]
    for pid in frontend_pids(srv):
        cmdline = " ".join(psutil.Process(pid).cmdline())
        assert key not in cmdline and "settings" not in cmdline and "keystore_pass" not in cmdline, cmdline
    conn, _ = connection(srv, "frontend")
    status, _, body = post(conn, "/predictions/rec", {"id": 1})
    assert status == 401 and b"Token Authorization failed" in body
    status, _, body = post(conn, "/predictions/rec", {"id": 2}, headers={"authorization": f"Bearer {key}"})
    assert status == 200 and json.loads(body)["id"] == 2


def test_a_hung_front_end_is_killed_and_started_again(osprey, store):
    """A stopped front end still holds its listening socket, so the kernel keeps handing it new
    connections that nobody answers: the server's heartbeat finds it silent past
    frontend_timeout, kills it and starts another."""
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 3, "frontend_timeout": 2})
    _, hung = connection(srv, "frontend")
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_until(lambda: "event=frontend_unresponsive" in srv.log() and "event=frontend_restarted" in srv.log(),
                   timeout=60, what="the hung front end to be replaced")
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert f"pid={hung}" in srv.log().split("event=frontend_unresponsive", 1)[1].splitlines()[0]
    wait_until(lambda: not alive(hung), what="the hung front end to be gone")
    now = frontend_pids(srv)
    assert len(now) == 2 and hung not in now
    conn, pid = connection(srv, "frontend")
    assert post(conn, "/predictions/rec", {"id": "after"})[0] == 200


def test_a_stalled_server_makes_front_ends_shed_not_buffer(osprey, store):
    """While the server is stopped, a front end relays what the link can hold and answers the
    rest 503 at once (it used to buffer every body: 750 MB in 20 s); once the server runs again,
    every relayed request is answered, none lost."""
    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 8})
    srv = osprey(["rec=rec.mar"], store, config={"frontends": 2, "max_request_size": 1 << 20})
    body = json.dumps({"id": 0, "pad": "x" * ((1 << 20) - 100)}).encode()
    conns = [connection(srv, "frontend")[0] for _ in range(40)]
    front = frontend_pids(srv)[0]
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        for c in conns:
            c.putrequest("POST", "/predictions/rec")
            c.putheader("content-type", "application/json")
            c.putheader("content-length", str(len(body)))
            c.endheaders()
            c.send(body)
        # past what the link holds (16 MiB), the front end answers while the server is stopped:
        # wait until some connections have an answer to read (the others wait for the server)
        import select

        answered = wait_for(lambda: select.select([c.sock for c in conns], [], [], 1.0)[0], 60,
                            "the front end to shed requests")
        by_sock = {c.sock: c for c in conns}
        shed = []
        for sock in answered:
            resp = by_sock[sock].getresponse()
            shed.append((resp.status, resp.getheader("retry-after"), resp.read()))
        assert shed and all(st == 503 and ra == "1" and b"not keeping up" in b for st, ra, b in shed), shed[:1]
        assert psutil.Process(front).memory_info().rss < 200 << 20
        wait_until(lambda: "event=frontend_shed" in srv.log(), what="the front end to log what it shed")
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    statuses = [s for s, _, _ in shed]
    for c in conns:
        if c.sock in answered:
            continue
        resp = c.getresponse()
        resp.read()
        statuses.append(resp.status)
    assert len(statuses) == 40 and set(statuses) <= {200, 503} and statuses.count(200) >= 10, statuses
    assert post(conns[0], "/predictions/rec", {"id": "after"})[0] == 200
    # in the server's metrics once the front end's next heartbeat says so
    wait_until(lambda: sample_value(srv.metrics, "osprey_frontend_shed_total") == statuses.count(503),
               what=f"osprey_frontend_shed_total to reach {statuses.count(503)}")
