"""A read-only model store, as KServe mounts /mnt/models and as TorchServe serves from: Osprey
starts, serves, keeps its own files in <workdir>/.osprey, and a retraining job, which would
have to publish into the store, fails at once saying which store is read-only.

The store is made read-only with a read-only bind mount where this runs as root with the right
to mount (CI's containers, this machine); as another user, with mode 0555 (which root ignores,
hence the mount); as root without the right to mount, the test is skipped."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager

import httpx
import pytest

from tests.models import mlp_archive


@contextmanager
def read_only(folder):
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield "mode 0555"
        finally:
            os.chmod(folder, 0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root without the right to mount here ({mounted.stderr.strip()}): no read-only store to test")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        yield "a read-only bind mount"
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_server_serves_from_a_read_only_store(osprey, store, tmp_path):
    # an entry point that would fail if it ran: the job must stop before training
    mlp_archive(store, config={"retraining": {"entry_point": "tests.retraining_entries:raises"}})
    with read_only(store):
        with pytest.raises(OSError):
            (store / "probe").write_text("")  # really read-only, also for this (root) process
        srv = osprey(models=["mlp.mar"], store=store)
        r = httpx.post(f"{srv.inference}/predictions/mlp", json=[1.0] * 16, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 4
        state = srv.workdir / ".osprey"
        assert f"model store {store} is not writable" in srv.log() and str(state) in srv.log()
        assert not (store / ".osprey").exists()

        # retraining would publish into the store: the job fails before any training, naming it
        r = httpx.post(f"{srv.management}/models/mlp/retrain", timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        assert (state / "jobs" / f"{job_id}.json").exists()  # the job's record, in the state folder
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{srv.management}/retraining/jobs/{job_id}", timeout=30).json())["state"] in (
                "queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["state"] == "failed", job
        assert f"the model store {store} is not writable" in job["message"]
        srv.stop()  # before the store is unmounted
