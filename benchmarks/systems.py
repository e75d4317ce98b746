"""The servers under test, each a real process tree on free loopback ports.

- :class:`Osprey`: ``osprey serve --foreground`` (token auth off).
- :class:`TorchServe`: ``torchserve --start --foreground`` from the benchmark's own venv
  (its pid file goes to a private TMPDIR so it never meets another TorchServe).
- :class:`FastAPIApp`: ``benchmarks/fastapi_app.py`` (the model called on the event loop).
- :class:`ConstantApp`: a bare uvicorn ASGI app returning a constant (Python HTTP ceiling).

Each records *start-up time* (process start to first successful answer, and to every
model answering) and offers the *resident memory* of its whole process tree.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from .models import BenchModel

__all__ = ["free_port", "Osprey", "TorchServe", "FastAPIApp", "ConstantApp", "tree_rss_mb", "post"]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def post(url: str, body: bytes, content_type: str, timeout: float = 5.0) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """A process tree started in its own session; stopped by its process group id."""

    name = "server"

    def __init__(self, work: Path, models: list[BenchModel]):
        self.work = work
        self.models = models
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0
        self.startup: dict[str, float] = {}
        self.log_path = work / f"{self.name}.log"
        self.inference = ""

    # subclasses set self.inference and return the command, env and cwd
    def command(self) -> tuple[list[str], dict, Path]:
        raise NotImplementedError

    def predict_url(self, model: str) -> str:
        return f"{self.inference}/predictions/{model}"

    @property
    def rss_pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return tree_rss_mb(self.rss_pid)

    def start(self, timeout: float = 240.0) -> "Server":
        self.work.mkdir(parents=True, exist_ok=True)
        cmd, env, cwd = self.command()
        self._log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_models(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def load_failed(self, model: str) -> str | None:
        """Why ``model`` failed to load, when the server's log says so (then it is skipped)."""
        return None

    def _wait_models(self, timeout: float) -> None:
        deadline = self.t0 + timeout
        self.failed: dict[str, str] = {}
        answered = []
        for m in self.models:
            body = m.body.read_bytes()
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                                       + self.log_path.read_text(errors="replace")[-3000:])
                try:
                    status, _ = post(self.predict_url(m.name), body, m.content_type, timeout=30)
                    if status == 200:
                        answered.append(m)
                        break
                except OSError:
                    pass
                why = self.load_failed(m.name)
                if why or time.monotonic() > deadline:
                    self.failed[m.name] = why or f"not answering after {timeout} s"
                    break
                time.sleep(0.02)
            if len(answered) == 1 and "first_answer_s" not in self.startup:
                self.startup["first_answer_s"] = time.monotonic() - self.t0
        if not answered:
            raise RuntimeError(f"{self.name}: no model answered: {self.failed}; log {self.log_path}")
        self.startup["all_models_s"] = time.monotonic() - self.t0
        self.startup["models"] = len(answered)
        self.models = answered

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything of this group still alive (e.g. TorchServe workers)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.killpg(pgid, 0)
                time.sleep(0.2)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()
        self.proc = None


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSPREY_", "TS_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Osprey(Server):
    name = "osprey"

    def __init__(self, work: Path, models: list[BenchModel], *, config: dict | None = None,
                 extra_args: list[str] | None = None, tag: str = "osprey"):
        self.name = tag
        super().__init__(work, models)
        self.config = config or {}
        self.extra_args = extra_args or []
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"

    def command(self):
        store = self.models[0].archive.parent
        cmd = [sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", str(store),
               "--inference-address", self.inference, "--management-address", self.management,
               "--metrics-address", f"http://127.0.0.1:{self.ports['metrics']}",
               "--grpc-inference-port", str(self.ports["grpc"]),
               "--grpc-management-port", str(self.ports["grpc_mgmt"]),
               "--pid-file", str(self.work / "osprey.pid"), "--disable-token-auth", "--log-level", "WARNING",
               "--models", *(f"{m.name}={m.archive.name}" for m in self.models), *self.extra_args]
        if self.config:
            props = self.work / "config.properties"
            props.write_text("".join(f"{k}={v}\n" for k, v in self.config.items()))
            cmd += ["--ts-config", str(props)]
        return cmd, _env(), self.work


class TorchServe(Server):
    name = "torchserve"

    def __init__(self, work: Path, models: list[BenchModel], ts_bin: Path, properties: dict | None = None):
        super().__init__(work, models)
        self.ts_bin = ts_bin
        self.properties = properties or {}
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"

    def command(self):
        store = self.models[0].archive.parent
        cfg = self.work / "config.properties"
        cfg.write_text("\n".join([
            f"inference_address={self.inference}",
            f"management_address={self.management}",
            f"metrics_address=http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_address=127.0.0.1", "grpc_management_address=127.0.0.1",
            f"grpc_inference_port={self.ports['grpc']}", f"grpc_management_port={self.ports['grpc_mgmt']}",
            "default_workers_per_model=1", "disable_token_authorization=true",
            *(f"{k}={v}" for k, v in self.properties.items()), ""]))
        tmp = self.work / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.ts_bin / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(store),
               "--ts-config", str(cfg), "--disable-token-auth",
               "--models", *(f"{m.name}={m.archive.name}" for m in self.models)]
        env = _env(TMPDIR=str(tmp), PATH=f"{self.ts_bin}:{os.environ.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        return cmd, env, self.work

    @property
    def rss_pid(self) -> int:
        """The JVM (its workers are its children); the Python launcher above it is not counted."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if "java" in child.name():
                    return child.pid
        except psutil.NoSuchProcess:
            pass
        return self.proc.pid

    def load_failed(self, model: str) -> str | None:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        if f"Load model failed: {model}," in text:
            errs = [ln for ln in text.splitlines() if "Error" in ln and "MODEL_LOG" in ln and f"-{model}_" in ln]
            return "TorchServe could not load it: " + (errs[-1].split("MODEL_LOG - ")[-1] if errs else "worker died")
        return None

    def describe(self, model: str) -> dict:
        parts = urlsplit(self.management)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", f"/models/{model}")
            data = json.loads(conn.getresponse().read())
            return data[0] if isinstance(data, list) and data else data
        finally:
            conn.close()


class FastAPIApp(Server):
    name = "fastapi"

    def __init__(self, work: Path, models: list[BenchModel]):
        super().__init__(work, [m for m in models if m.weights is not None])
        self.port = free_port()
        self.inference = f"http://127.0.0.1:{self.port}"

    def command(self):
        spec = json.dumps({m.name: {"weights": str(m.weights), "kind": m.kind, "shape": list(m.input_shape)}
                           for m in self.models})
        return [sys.executable, "-m", "benchmarks.fastapi_app", "--port", str(self.port), "--models", spec], _env(), self.work


class ConstantApp(Server):
    name = "uvicorn_constant"

    def __init__(self, work: Path, models: list[BenchModel]):
        super().__init__(work, models[:1])
        self.port = free_port()
        self.inference = f"http://127.0.0.1:{self.port}"

    def command(self):
        return [sys.executable, "-m", "benchmarks.asgi_constant", "--port", str(self.port)], _env(), self.work
