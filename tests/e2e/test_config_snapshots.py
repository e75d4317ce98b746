"""TorchServe's config snapshots through ``osprey torchserve`` (server/snapshots.py), with real
server processes: each management change that succeeds writes logs/config/<time>-snapshot.cfg
before it is answered, a stop writes -shutdown.cfg, and a start without --ts-config registers the
models of the last snapshot again with their workers and settings (and takes its configuration:
its ports). A folder that cannot be written fails no change and is logged once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import javaproperties

from server.snapshots import read_snapshot
from tests.conftest import ROOT, free_port
from tests.models import handler_archive

NOOP = "def handle(data, context):\n    return None if data is None else [1 for _ in data]\n"
WAIT_S = 60.0


class Started:
    """``osprey torchserve --start ...`` as TorchServe's harness runs it: returns at once, the
    server goes on writing to the same pipe, read here line by line (a thread)."""

    def __init__(self, cwd: Path, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(cwd)}
        for key in [k for k in env if k.startswith(("TS_", "OSPREY_")) or k in ("LOG_LOCATION", "METRICS_LOCATION")]:
            del env[key]
        self.env, self.cwd, self.lines = env, cwd, []
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "torchserve", "--start", *args], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        self.wait_for("Model server started")

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.lines)[-3000:]}"
            time.sleep(0.02)

    def stop(self) -> None:
        r = subprocess.run([sys.executable, "-m", "server.cli", "torchserve", "--stop", "--foreground"],
                           cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=WAIT_S)
        assert r.returncode == 0, r.stdout + r.stderr
        self.reader.join(WAIT_S)  # the server's end closes the pipe
        self.proc.stdout.close()


def written(path: Path) -> dict[str, str]:
    """The keys of a snapshot as written (read_snapshot sets tsConfigFile to the snapshot itself)."""
    return javaproperties.loads(path.read_text(encoding="latin-1"))


def snapshots(folder: Path, kind: str = "") -> list[Path]:
    return sorted(p for p in folder.glob(f"*-{kind or '*'}.cfg"))


def test_management_changes_write_snapshots_and_a_restart_restores_the_last(tmp_path):
    store = tmp_path / "store"
    handler_archive(store, "noop", NOOP)
    handler_archive(store, "noop2", NOOP, version="2.0")
    ports = [free_port() for _ in range(3)]
    (tmp_path / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\nenable_grpc=false\n")
    folder = tmp_path / "logs" / "config"
    mgmt = httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=WAIT_S)
    flags = ("--model-store", "store", "--disable-token-auth", "--enable-model-api")
    server = Started(tmp_path, *flags, "--ts-config", "config.properties")
    try:
        [startup] = snapshots(folder, "startup")
        assert read_snapshot(startup).models == []
        first = written(startup)
        assert first["tsConfigFile"] == "config.properties"
        assert first["inference_address"] == f"http://127.0.0.1:{ports[0]}"
        assert first["model_store"] == "store" and first["enable_model_api"] == "true"

        def change(method: str, url: str) -> Path:
            """The change is answered 2xx, and a new snapshot is there when it is."""
            before = snapshots(folder, "snapshot")
            answer = mgmt.request(method, url)
            assert answer.status_code < 300, answer.text
            after = snapshots(folder, "snapshot")
            assert len(after) == len(before) + 1
            return after[-1]

        t0 = time.perf_counter()
        change("POST", "/models?url=noop.mar&initial_workers=1&batch_size=4&max_batch_delay=50&response_timeout=33")
        change("POST", "/models?url=noop2.mar&model_name=noop")  # no workers (TorchServe's default of 0)
        change("PUT", "/models/noop/1.0?min_worker=2&max_worker=3&synchronous=true")
        change("PUT", "/models/noop/2.0?min_worker=1&synchronous=true")
        last = change("PUT", "/models/noop/2.0/set-default")
        print(f"5 changes with their snapshots: {time.perf_counter() - t0:.3f} s")
        # a change that fails writes nothing
        assert mgmt.put("/models/noop/9.0/set-default").status_code == 404
        assert snapshots(folder, "snapshot")[-1] == last
        models = {m.version: m for m in read_snapshot(last).models}
        one, two = models["1.0"], models["2.0"]
        assert (one.default, one.mar_name, one.min_workers, one.max_workers, one.batch_size, one.max_batch_delay,
                one.response_timeout) == (False, "noop.mar", 2, 3, 4, 50, 33)
        assert (two.default, two.mar_name, two.min_workers) == (True, "noop2.mar", 1)
    finally:
        mgmt.close()  # no kept-alive connection for the stop's drain to linger on
        server.stop()
    [shutdown] = snapshots(folder, "shutdown")
    assert {m.version: m.min_workers for m in read_snapshot(shutdown).models} == {"1.0": 2, "2.0": 1}

    # no --ts-config: the last snapshot (the shutdown one) is the configuration, its models come back
    server = Started(tmp_path, *flags)
    mgmt = httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=WAIT_S)
    try:
        described = {d["modelVersion"]: d for d in mgmt.get("/models/noop/all").json()}
        assert {v: (d["minWorkers"], d["maxWorkers"], len(d["workers"])) for v, d in described.items()} == {
            "1.0": (2, 3, 2), "2.0": (1, 1, 1)}
        assert (described["1.0"]["batchSize"], described["1.0"]["maxBatchDelay"],
                described["1.0"]["responseTimeout"]) == (4, 50, 33)
        assert mgmt.get("/models/noop").json()[0]["modelVersion"] == "2.0"  # the default again
        assert httpx.post(f"http://127.0.0.1:{ports[0]}/predictions/noop", content=b"x").status_code == 200
        restarted = snapshots(folder, "startup")[-1]
        assert written(restarted)["tsConfigFile"] == str(Path("logs") / "config" / shutdown.name)
        assert len(read_snapshot(restarted).models) == 2

        # logs/config taken by a file: changes still succeed, the failure is logged once
        blocked = tmp_path / "logs" / "config-kept"
        folder.rename(blocked)
        folder.write_text("not a folder")
        assert mgmt.put("/models/noop/1.0?min_worker=1&synchronous=true").status_code == 200
        assert mgmt.put("/models/noop/1.0?min_worker=2&synchronous=true").status_code == 200
        folder.unlink()
        assert mgmt.put("/models/noop/1.0?min_worker=1&synchronous=true").status_code == 200
        server.wait_for("config snapshots are written to")  # every line before it has been read
        assert sum("config snapshot (snapshot) not written" in line for line in server.lines) == 1
        assert len(snapshots(folder, "snapshot")) == 1
    finally:
        mgmt.close()
        server.stop()


def test_a_ts_config_holding_model_snapshot_starts_its_models(tmp_path):
    """KServe's TorchServe runtime hands its models over as ``model_snapshot`` in the
    config.properties it passes with --ts-config: they are registered with their settings, as
    TorchServe does, with snapshots off too; an archive it names that is not there is refused."""
    import json

    store = tmp_path / "store"
    handler_archive(store, "noop", NOOP)
    ports = [free_port() for _ in range(3)]
    models = {"noop": {"1.0": {"defaultVersion": True, "marName": "noop.mar", "minWorkers": 2, "maxWorkers": 2,
                               "batchSize": 2, "maxBatchDelay": 50, "responseTimeout": 7}}}
    base = (f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
            f"metrics_address=http://127.0.0.1:{ports[2]}\nenable_grpc=false\n")
    (tmp_path / "config.properties").write_text(
        base + "model_snapshot=" + json.dumps({"name": "startup.cfg", "modelCount": 1, "models": models}) + "\n")
    server = Started(tmp_path, "--model-store", "store", "--disable-token-auth", "--ncs",
                     "--ts-config", "config.properties")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=WAIT_S) as mgmt:
            [d] = mgmt.get("/models/noop").json()
        assert (d["modelVersion"], d["minWorkers"], d["maxWorkers"], len(d["workers"]), d["batchSize"],
                d["maxBatchDelay"], d["responseTimeout"]) == ("1.0", 2, 2, 2, 2, 50, 7)
        assert httpx.post(f"http://127.0.0.1:{ports[0]}/predictions/noop", content=b"x").status_code == 200
    finally:
        server.stop()
    models["noop"]["1.0"]["marName"] = "gone.mar"
    (tmp_path / "config.properties").write_text(
        base + "model_snapshot=" + json.dumps({"name": "startup.cfg", "modelCount": 1, "models": models}) + "\n")
    env = {k: v for k, v in server.env.items()}
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", "store",
                        "--disable-token-auth", "--no-config-snapshots", "--ts-config", "config.properties"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 2 and "model_snapshot in config.properties: the archive gone.mar of model noop" in r.stderr, \
        r.stdout + r.stderr


def test_the_models_property_sets_the_startup_models_settings(tmp_path):
    """TorchServe's ``models`` property in config.properties: the settings of each model version
    loaded at start, over its model-config.yaml; JSON that is not of that form stops the start
    naming it."""
    import json

    store = tmp_path / "store"
    handler_archive(store, "noop", NOOP)
    ports = [free_port() for _ in range(3)]
    base = (f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
            f"metrics_address=http://127.0.0.1:{ports[2]}\nenable_grpc=false\nload_models=noop.mar\n")
    models = {"noop": {"1.0": {"minWorkers": 2, "maxWorkers": 3, "batchSize": 2, "maxBatchDelay": 50,
                               "responseTimeout": 7, "marName": "noop.mar", "deviceType": "cpu"}}}
    (tmp_path / "config.properties").write_text(base + "models=" + json.dumps(models) + "\n")
    server = Started(tmp_path, "--model-store", "store", "--disable-token-auth", "--ncs",
                     "--ts-config", "config.properties")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=WAIT_S) as mgmt:
            [d] = mgmt.get("/models/noop").json()
        assert (d["minWorkers"], d["maxWorkers"], len(d["workers"]), d["batchSize"], d["maxBatchDelay"],
                d["responseTimeout"]) == (2, 3, 2, 2, 50, 7)
    finally:
        server.stop()
    (tmp_path / "config.properties").write_text(base + 'models={"noop": {"1.0": {"batchSize": "four"}}}\n')
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", "store",
                        "--disable-token-auth", "--ts-config", "config.properties"],
                       cwd=tmp_path, env=server.env, capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 2 and "setting models: model 'noop' version '1.0': batchSize must be a non-negative " \
                                 "whole number, got 'four'" in r.stderr, r.stdout + r.stderr
