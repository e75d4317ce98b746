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
