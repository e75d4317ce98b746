"""The ``osprey`` command: package, serve in the background, stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.models import MLP_HANDLER, make_mlp


def osprey(*args, cwd, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_package_serve_in_background_and_stop(tmp_path):
    make_mlp(tmp_path / "mlp.pt")
    (tmp_path / "handler.py").write_text(MLP_HANDLER)
    (tmp_path / "cfg.yaml").write_text("batchSize: 4\nmaxBatchDelay: 5\n")
    r = osprey("package", "--model-name", "mlp", "--serialized-file", "mlp.pt", "--handler", "handler.py",
               "--config-file", "cfg.yaml", "--export-path", "store", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "store" / "mlp.mar") as zf:
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
    assert manifest["model"] == {"modelName": "mlp", "serializedFile": "mlp.pt", "handler": "handler.py",
                                 "modelVersion": "1.0", "configFile": "cfg.yaml"}
    r = osprey("package", "--model-name", "mlp", "--serialized-file", "mlp.pt", "--handler", "handler.py",
               "--export-path", "store", cwd=tmp_path)
    assert r.returncode == 1 and "--force" in r.stderr

    (tmp_path / "store" / "broken.mar").write_bytes(b"PK\x03\x04broken")  # one that cannot load: said on start
    ports = [free_port() for _ in range(5)]
    pid_file = str(tmp_path / "osprey.pid")
    r = osprey("serve", "--model-store", "store", "--models", "all", "--disable-token-auth",
               "--inference-address", f"http://127.0.0.1:{ports[0]}", "--management-address", f"http://127.0.0.1:{ports[1]}",
               "--metrics-address", f"http://127.0.0.1:{ports[2]}", "--grpc-inference-port", str(ports[3]),
               "--grpc-management-port", str(ports[4]), "--pid-file", pid_file, cwd=tmp_path)
    try:
        assert r.returncode == 0, r.stderr + r.stdout
        assert "Osprey started" in r.stdout
        assert "osprey serve: 1 of 2 models did not load (broken.mar); the reasons are in" in r.stderr, r.stderr
        answer = httpx.post(f"http://127.0.0.1:{ports[0]}/predictions/mlp", json=[1.0] * 16)
        assert answer.status_code == 200 and len(answer.json()) == 4
        again = osprey("serve", "--model-store", "store", "--pid-file", pid_file, cwd=tmp_path)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stop = osprey("stop", "--pid-file", pid_file, cwd=tmp_path)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not os.path.exists(pid_file)


def test_serve_reports_a_bad_config_file(tmp_path):
    r = osprey("serve", "--foreground", "--ts-config", "missing.properties", cwd=tmp_path)
    assert r.returncode == 2 and "missing.properties" in r.stderr


@pytest.mark.parametrize("taken", ["inference", "grpc_management"])
def test_serve_says_which_address_is_taken_and_exits(tmp_path, taken):
    """A port another program holds: exit 1 naming the address, no traceback, nothing left listening."""
    import socket

    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_management")}
    holder = socket.socket()
    holder.bind(("127.0.0.1", ports[taken]))
    holder.listen()
    try:
        r = osprey("serve", "--foreground", "--model-store", str(tmp_path), "--disable-token-auth",
                   "--inference-address", f"http://127.0.0.1:{ports['inference']}",
                   "--management-address", f"http://127.0.0.1:{ports['management']}",
                   "--metrics-address", f"http://127.0.0.1:{ports['metrics']}",
                   "--grpc-inference-port", str(ports["grpc"]),
                   "--grpc-management-port", str(ports["grpc_management"]),
                   "--pid-file", str(tmp_path / "osprey.pid"), cwd=tmp_path, timeout=60)
    finally:
        holder.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"osprey: could not listen on " in r.stderr and f"127.0.0.1:{ports[taken]}" in r.stderr
    assert "Traceback" not in r.stderr
    for port in ports.values():  # what had started was closed again
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_startup_model_that_fails_is_skipped_and_the_rest_serve(osprey_module, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "broken.mar").write_bytes(b"PK\x03\x04broken")
    make_mlp(tmp_path / "mlp.pt")
    (tmp_path / "handler.py").write_text(MLP_HANDLER)
    r = osprey("package", "--model-name", "good", "--serialized-file", str(tmp_path / "mlp.pt"), "--handler",
               str(tmp_path / "handler.py"), "--export-path", str(store), cwd=tmp_path)
    assert r.returncode == 0
    srv = osprey_module(["all"], store)
    assert httpx.post(f"{srv.inference}/predictions/good", json=[1.0] * 16).status_code == 200
    assert httpx.post(f"{srv.inference}/predictions/broken", json=[1.0] * 16).status_code == 404
    assert "broken.mar" in srv.log()


def test_sigterm_answers_every_accepted_request_before_exiting(osprey, store, tmp_path):
    import concurrent.futures as cf
    import re

    from tests.gates import Gate, pending, wait_until
    from tests.models import RECORDING_HANDLER, handler_archive

    handler_archive(store, "rec", RECORDING_HANDLER, config={"batchSize": 2, "maxBatchDelay": 10})
    srv = osprey(["rec=rec.mar"], store)
    gate = Gate(tmp_path)

    def call(body):
        return httpx.post(f"{srv.inference}/predictions/rec", json=body, timeout=60)

    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(call, {"id": 0, "gate": gate.value})]  # holds the only instance
        gate.wait_entered()
        futs += [pool.submit(call, {"id": i}) for i in range(1, 6)]
        wait_until(lambda: pending(srv, "rec") == 5, what="five requests queued")
        srv.proc.terminate()
        wait_until(lambda: " event=drain_started " in srv.log(), what="the drain to start")
        gate.open()
        results = [f.result() for f in futs]
    assert [r.status_code for r in results] == [200] * 6
    assert [r.json()["id"] for r in results] == list(range(6))
    assert srv.proc.wait(30) == 0
    started = re.search(r" event=drain_started queued=(\d+) running=(\d+) timeout_s=", srv.log())
    assert started and int(started[1]) + int(started[2]) >= 5, srv.log()[-2000:]  # the drain is logged
    assert re.search(r" event=drain_finished seconds=[\d.]+ unanswered=0 timed_out=false", srv.log())


def test_an_exited_server_nobody_reaped_counts_as_stopped():
    """In a container whose PID 1 does not reap, a stopped server stays a zombie: not running."""
    import time

    from server.cli import _pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while _pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _pid_alive(child.pid)  # exited, not yet reaped (we have not waited on it)
        assert _pid_alive(os.getpid())
    finally:
        child.wait()


def _no_grpc_shim(tmp_path) -> str:
    """A PYTHONPATH on which ``import grpc`` fails as if grpcio were not installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "grpc.py").write_text('raise ModuleNotFoundError("No module named \'grpc\'", name="grpc")\n')
    return f"{shim}{os.pathsep}{ROOT}"


def test_missing_grpc_dependency_fails_start_naming_it(tmp_path):
    ports = [free_port() for _ in range(5)]
    env = {**os.environ, "PYTHONPATH": _no_grpc_shim(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", str(tmp_path),
                        "--disable-token-auth", "--inference-address", f"http://127.0.0.1:{ports[0]}",
                        "--management-address", f"http://127.0.0.1:{ports[1]}",
                        "--metrics-address", f"http://127.0.0.1:{ports[2]}", "--grpc-inference-port", str(ports[3]),
                        "--grpc-management-port", str(ports[4]), "--pid-file", str(tmp_path / "osprey.pid")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "module 'grpc' cannot be imported" in r.stderr and "pip install grpcio" in r.stderr, r.stderr
    assert "--no-grpc" in r.stderr and "Traceback" not in r.stderr
    assert "Osprey ready" not in r.stdout


def test_without_grpc_dependency_serves_rest_when_grpc_is_disabled(osprey, tmp_path, store):
    srv = osprey([], store, extra_args=["--no-grpc"], env={"PYTHONPATH": _no_grpc_shim(tmp_path)})
    assert httpx.get(f"{srv.inference}/ping").status_code == 200


def test_version_and_package_help(tmp_path):
    from handlers.builtin import BUILTIN_HANDLERS
    from server import __version__

    r = osprey("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"osprey {__version__}", r.stdout + r.stderr
    r = osprey("package", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import argparse

    from server.cli import _package_parser

    parser = argparse.ArgumentParser()
    _package_parser(parser.add_subparsers())
    package = parser._subparsers._group_actions[0].choices["package"]
    flags = [a for a in package._actions if a.option_strings and a.dest != "help"]
    # torch-model-archiver 0.12's 12 (with --runtime) + --reference-data
    assert len(flags) == 13 and all(a.help for a in flags), [a.dest for a in flags if not a.help]
    text = " ".join(r.stdout.split())  # argparse wraps lines
    for name in BUILTIN_HANDLERS:
        assert name in text, name
