"""``osprey torchserve``: TorchServe 0.12's ``torchserve`` command line (server/torchserve_cli.py),
and ``osprey package`` with the torch-model-archiver flags it lacked (--runtime, -v, zip-store)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile

import httpx

from server.cli import _pid_alive
from tests.conftest import ROOT, free_port
from tests.models import MLP_HANDLER, make_mlp


def _env(tmp_path):
    # a private TMPDIR: the pid file (TorchServe's place, tempdir/.osprey.pid here) is this test's own
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}


def _config_properties(tmp_path, extra: str = "") -> list[int]:
    """config.properties in ``tmp_path`` with free loopback ports for the five listeners (plus
    ``extra`` lines); the ports, inference first."""
    ports = [free_port() for _ in range(5)]
    (tmp_path / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{ports[0]}\nmanagement_address=http://127.0.0.1:{ports[1]}\n"
        f"metrics_address=http://127.0.0.1:{ports[2]}\ngrpc_inference_port={ports[3]}\n"
        f"grpc_management_port={ports[4]}\n{extra}")
    return ports


def torchserve(*args, cwd, timeout=60):  # a process of its own, as scripts run it
    return subprocess.run([sys.executable, "-m", "server.cli", "torchserve", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env(cwd))


def _main(capsys, *argv):
    from server.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_refusals_use_torchserves_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("server.cli.DEFAULT_PID_FILE", str(tmp_path / ".osprey.pid"))
    monkeypatch.delenv("TS_CONFIG_FILE", raising=False)
    ts = ("torchserve",)
    assert _main(capsys, *ts, "--start") == (1, "Missing mandatory parameter --model-store\n", "")
    assert _main(capsys, *ts, "--start", "--model-store", "nowhere") == (
        1, "--model-store directory not found: nowhere\n", "")
    assert _main(capsys, *ts, "--start", "--model-store", ".", "--ts-config", "none.properties") == (
        1, "--ts-config file not found: none.properties\n", "")
    try:
        assert _main(capsys, *ts, "--start", "--model-store", ".", "--workflow-store", "nowhere") == (
            1, "--workflow-store directory not found: nowhere\n", "")
    finally:  # a start that was not refused runs a server on TorchServe's default ports: stop it
        if (tmp_path / ".osprey.pid").exists():
            _main(capsys, *ts, "--stop", "--foreground")
    monkeypatch.setenv("TS_CONFIG_FILE", "env.properties")  # TorchServe's variable wins over --ts-config
    assert _main(capsys, *ts, "--model-store", ".", "--ts-config", "none.properties")[1] == (
        "--ts-config file not found: env.properties\n")
    assert _main(capsys, *ts, "--stop") == (0, "TorchServe is not currently running.\n", "")
    code, _, err = _main(capsys, *ts, "--start", "--stop")  # one of -v/--start/--stop, as in TorchServe
    assert code == 2 and "not allowed with argument" in err
    code, out, _ = _main(capsys, *ts, "-v")
    assert code == 0 and out.startswith("TorchServe Version is 0.12.0 (Osprey ")


def test_start_in_background_then_stop_as_the_torchserve_harness_does(tmp_path):
    """ts.launcher.start: Popen(torchserve --start ...), read its output until "Model server started";
    ts.launcher.stop: torchserve --stop --foreground, which returns once the server is gone."""
    store = tmp_path / "store"
    make_mlp(tmp_path / "mlp.pt")
    (tmp_path / "handler.py").write_text(MLP_HANDLER)
    # TorchServe's flags for the archiver: --runtime, -v, --archive-format zip-store (ts_scripts/marsgen.py)
    r = subprocess.run([sys.executable, "-m", "server.cli", "package", "--model-name", "mlp", "-v", "2.0",
                        "--serialized-file", "mlp.pt", "--handler", "handler.py", "--runtime", "python",
                        "--archive-format", "zip-store", "--export-path", str(store), "--force"],
                       cwd=tmp_path, capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(store / "mlp.mar") as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "2.0"
    from tests.workflow_archives import SEQUENTIAL, node_models, war_archive

    node_models(store)
    (tmp_path / "wf").mkdir()
    war_archive(tmp_path / "wf", "seq", SEQUENTIAL)
    ports = _config_properties(tmp_path)
    cmd = [sys.executable, "-m", "server.cli", "torchserve", "--start", "--ncs", "--model-store", "store",
           "--ts-config", "config.properties", "--models", "mlp=mlp.mar", "--plugins-path", "plugins",
           "--workflow-store", "wf", "--enable-model-api"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.wait(timeout=30) == 0  # returns at once: the server runs on, writing to the same pipe
        lines = []
        for line in proc.stdout:  # as ts.launcher.start reads it
            lines.append(line.decode())
            if "Model server started" in lines[-1]:
                break
        out = "".join(lines)
        assert "--plugins-path Java plugin jars: Osprey loads no Java plugins; ignored" in out
        pid = int((tmp_path / ".osprey.pid").read_text())
        key = json.loads((tmp_path / "key_file.json").read_text())["inference"]["key"]  # token auth is on
        answer = httpx.post(f"http://127.0.0.1:{ports[0]}/predictions/mlp", json=[1.0] * 16,
                            headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200 and len(answer.json()) == 4
        # the workflow store is where POST /workflows finds .war files, as in TorchServe
        keys = json.loads((tmp_path / "key_file.json").read_text())
        m_auth = {"Authorization": f"Bearer {keys['management']['key']}"}
        r = httpx.post(f"http://127.0.0.1:{ports[1]}/workflows", params={"url": "seq.war"}, headers=m_auth,
                       timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/wfpredict/seq", json=3, timeout=60,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json() == {"result": 7}, r.text
        again = torchserve("--start", "--model-store", "store", cwd=tmp_path)
        assert again.returncode == 1
        assert again.stdout == "TorchServe is already running, please use torchserve --stop to stop TorchServe.\n"
    finally:
        stop = torchserve("--stop", "--foreground", cwd=tmp_path)
    assert stop.returncode == 0 and stop.stdout == ""  # TorchServe's --stop --foreground prints nothing
    assert not _pid_alive(pid)
    assert not (tmp_path / ".osprey.pid").exists() and not (tmp_path / "key_file.json").exists()
    assert (tmp_path / "logs" / "ts_log.log").exists() and not (tmp_path / "logs" / "config").exists()  # --ncs
    proc.stdout.close()


def test_package_refuses_the_lsp_runtime(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "handler.py").write_text(MLP_HANDLER)
    code, _, err = _main(capsys, "package", "--model-name", "m", "--handler", "handler.py", "--runtime", "LSP")
    assert code == 1 and "LSP is TorchServe's C++ backend" in err and not (tmp_path / "m.mar").exists()


def test_package_warns_of_a_handler_nothing_here_knows(tmp_path, monkeypatch, capsys):
    """A typo in --handler used to write the archive without a word; it loaded nowhere. Such a
    name may still be a module installed where the archive is served, so the archive is
    written, with a warning naming the built-ins and the closest one."""
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "package", "--model-name", "m", "--handler", "image_clasifier")
    assert code == 0 and (tmp_path / "m.mar").exists()
    assert "warning: handler 'image_clasifier' is not a file, not a built-in handler (" in err
    assert "did you mean 'image_classifier'?" in err
    (tmp_path / "my_handler.py").write_text(MLP_HANDLER)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "serving.py").write_text(MLP_HANDLER)
    for handler, extra in (("image_classifier", ""), ("my_handler.py", ""), ("my_handler:handle", "my_handler.py"),
                           ("json:loads", ""), ("mypkg.serving:handle", "mypkg")):
        code, _, err = _main(capsys, "package", "--model-name", "m", "--handler", handler, "--extra-files", extra,
                             "--force")
        assert code == 0 and "warning" not in err, (handler, err)


def test_stopping_the_foreground_command_stops_the_server(tmp_path):
    """A supervisor that runs ``torchserve --start --foreground`` and stops it with SIGTERM to
    that pid alone (systemd KillMode=process, supervisord, `kill`) stops the server too: the
    command passes the signal on and exits with the server's status, leaving no server holding
    the ports."""
    (tmp_path / "store").mkdir()
    ports = _config_properties(tmp_path, "disable_token_authorization=true\n")
    cmd = [sys.executable, "-m", "server.cli", "torchserve", "--start", "--foreground", "--ncs", "--model-store",
           "store", "--ts-config", "config.properties"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: the signal reaches the command only
    try:
        for line in proc.stdout:
            if b"Model server started" in line:
                break
        server = int((tmp_path / ".osprey.pid").read_text())
        assert server != proc.pid and _pid_alive(server)
        assert httpx.get(f"http://127.0.0.1:{ports[0]}/ping").status_code == 200
        proc.send_signal(signal.SIGTERM)  # to the command, not to its group
        assert proc.wait(timeout=60) == 0  # the server stopped cleanly, and the command with it
        assert not _pid_alive(server)
    finally:
        try:  # the command and the server share the command's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
