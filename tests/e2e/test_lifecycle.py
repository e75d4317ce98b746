"""What operators see around a server's life: extraction folders a killed server left are
removed at the next start (a live server's are kept); lifecycle events in the log."""

from __future__ import annotations

import httpx

from tests.conftest import OspreyProcess
from tests.models import mlp_archive


def _owned(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_a_killed_servers_extraction_folder_is_removed_at_the_next_start(tmp_path, store):
    mlp_archive(store)
    shared = tmp_path / "shared"  # the work dir the servers share (OSPREY_WORKDIR)
    shared.mkdir()
    root = shared / ".osprey" / "models"
    started = []

    def start(n: int) -> OspreyProcess:
        own = tmp_path / f"s{n}"  # own cwd, log and pid file
        own.mkdir()
        proc = OspreyProcess(own, store, ["mlp=mlp.mar"], extra_args=["--no-grpc"],
                             env={"OSPREY_WORKDIR": str(shared)})
        started.append(proc)
        return proc.wait_ready()

    try:
        first = start(0)
        [killed] = _owned(root)
        assert any((root / killed).iterdir())  # the extracted archive
        first.proc.kill()
        first.proc.wait(10)
        assert _owned(root) == [killed]  # SIGKILL: nothing could clean up

        second = start(1)
        [kept] = _owned(root)
        assert kept != killed and not (root / f"{killed}.lock").exists()
        assert "removed 1 extraction folder" in second.log()

        third = start(2)  # a second live server in the same work dir keeps the other's folder
        assert kept in _owned(root) and len(_owned(root)) == 2
        assert "removed" not in third.log()
        for srv in (second, third):
            assert httpx.post(f"{srv.inference}/predictions/mlp", json=[1.0] * 16, timeout=30).status_code == 200
        third.stop()
        assert _owned(root) == [kept]  # a clean stop removes its own folder
    finally:
        for proc in started:
            proc.stop()


def test_queue_full_burst_is_one_line_with_the_count_and_shutdown_logs_the_drain(osprey, store, tmp_path):
    import concurrent.futures as cf
    import re

    from tests.gates import Gate, pending, wait_until
    from tests.models import RECORDING_HANDLER, handler_archive

    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 1, "jobQueueSize": 2, "minWorkers": 1,
                                                              "maxWorkers": 1})
    srv = osprey(["rec=rec.mar"], store, extra_args=["--no-grpc"])
    gate = Gate(tmp_path)

    def call(body):
        return httpx.post(f"{srv.inference}/predictions/rec", json=body, timeout=60).status_code

    with cf.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(call, {"id": 0, "gate": gate.value})]
        gate.wait_entered()
        held += [pool.submit(call, {"id": i}) for i in (1, 2)]
        wait_until(lambda: pending(srv, "rec") == 2, what="two queued requests")
        refused = [call({"id": i}) for i in range(3, 23)]
        gate.open()
        assert [f.result() for f in held] == [200] * 3
    assert refused == [503] * 20
    wait_until(lambda: "event=queue_full" in srv.log(), what="the queue_full line (one per 5 s window)")
    lines = [line for line in srv.log().splitlines() if "event=queue_full" in line]
    assert len(lines) == 1, lines
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING osprey\.batching: event=queue_full model=rec "
                     r"version=1\.0 refused=20 queue_size=2 window_s=5$", lines[0]), lines[0]
    srv.stop()
    log = srv.log()
    assert re.search(r" event=drain_started queued=0 running=0 timeout_s=\d+", log), log[-2000:]
    assert re.search(r" event=drain_finished seconds=[\d.]+ unanswered=0 timed_out=false", log), log[-2000:]
