"""Shared fixtures: start the real ``osprey serve`` process on free loopback ports."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# TorchServe's own pytest modules (copied, with their own conftest): run by
# tests/e2e/test_torchserve_pytest.py in a pytest process of their own, never collected here
collect_ignore = ["torchserve_pytest"]


_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that is free now and that no outgoing connection will take.

    ``bind(0)`` draws from the kernel's ephemeral range, the same ports the tests' own client
    connections get as local ports: one of them can take the port between this check and the
    server's bind (CI saw exactly that). Ports below the range are never given to outgoing
    connections; each is handed out once per test session, so no TIME_WAIT from an earlier
    server is in the way.
    """
    low = _ephemeral_low()
    if low > 12000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10000, low)
            if port in _GIVEN:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OspreyProcess:
    """A real ``osprey serve --foreground`` process on free ports, in its own work dir."""

    def __init__(self, workdir: Path, store: Path, models: list[str], *, token_auth: bool = False,
                 model_api: bool = True, extra_args: list[str] | None = None, config: dict | None = None,
                 env: dict | None = None, scheme: str = "http", prefix: list[str] | None = None):
        self.workdir = workdir
        self.store = store
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
        self.inference = f"{scheme}://127.0.0.1:{self.ports['inference']}"  # scheme https: TLS (tests/e2e/test_tls.py)
        self.management = f"{scheme}://127.0.0.1:{self.ports['management']}"
        self.metrics = f"{scheme}://127.0.0.1:{self.ports['metrics']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"
        self.grpc_management = f"127.0.0.1:{self.ports['grpc_mgmt']}"
        args = [*(prefix or []), sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", str(store),
                "--inference-address", self.inference, "--management-address", self.management,
                "--metrics-address", self.metrics, "--grpc-inference-port", str(self.ports["grpc"]),
                "--grpc-management-port", str(self.ports["grpc_mgmt"]),
                "--pid-file", str(workdir / "osprey.pid")]
        if models:
            args += ["--models", *models]
        if not token_auth:
            args.append("--disable-token-auth")
        if model_api:
            args.append("--enable-model-api")
        if config:
            props = workdir / "config.properties"
            props.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
            args += ["--ts-config", str(props)]
        args += extra_args or []
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 60.0) -> "OspreyProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"osprey exited with {self.proc.returncode}:\n{self.log()}")
            if "Osprey ready" in self.log():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"osprey not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def keys(self) -> dict:
        return json.loads((self.workdir / "key_file.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class ServerPool:
    """Starts OspreyProcess servers under one root folder and stops them all at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[OspreyProcess] = []

    def __call__(self, models: list[str] | None = None, store: Path | None = None, **kwargs) -> OspreyProcess:
        for attempt in range(3):
            work = self.root / f"server{len(self.started)}"
            work.mkdir()
            proc = OspreyProcess(work, store or self.root / "store", models or [], **kwargs)
            self.started.append(proc)
            try:
                return proc.wait_ready()
            except RuntimeError:
                # another program took one of the ports after free_port checked it: new ports
                if attempt == 2 or "could not listen" not in proc.log():
                    raise
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()


def pytest_configure(config):
    """The controlling process (not an xdist worker) makes the folder every worker builds the
    example archives into, once per run (tests/builtin_models.py); removed at the end."""
    from tests.builtin_models import SHARED_ENV

    if hasattr(config, "workerinput") or os.environ.get(SHARED_ENV):
        return
    import tempfile

    os.environ[SHARED_ENV] = tempfile.mkdtemp(prefix="osprey-test-examples-")
    config._osprey_examples = os.environ[SHARED_ENV]


def pytest_unconfigure(config):
    import shutil

    folder = getattr(config, "_osprey_examples", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("OSPREY_TEST_EXAMPLES_SHARED", None)


@pytest.fixture
def osprey(tmp_path):
    """Start servers: ``osprey(models=[...], store=path, ...)``; all are stopped afterwards."""
    pool = ServerPool(tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def osprey_module(tmp_path_factory):
    """Like ``osprey`` but shared by the tests of one module (start once, stop at the end)."""
    pool = ServerPool(tmp_path_factory.mktemp("module-server"))
    yield pool
    pool.stop_all()


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


# Seconds each of the slowest test files took in a whole run (2 cores, pytest-xdist -n 2 --dist
# loadfile, 2026-11-30). They are run first: xdist hands each worker whole files in collection
# order, and a long file collected last keeps one worker busy while the other has nothing left
# (the run's wall time is then that file's, not half the total).
SLOW_FILES = {
    "tests/e2e/test_torchserve_pytest.py": 188, "tests/e2e/test_retraining_loop.py": 144,
    "tests/e2e/test_hot_swap.py": 100, "tests/unit/test_builtin_handlers.py": 85,
    "tests/e2e/test_monitoring.py": 76, "tests/e2e/test_isolation.py": 65,
    "tests/e2e/test_torchserve_postman.py": 55, "tests/e2e/test_retraining_jobs.py": 55,
    "tests/e2e/test_bad_input_handlers.py": 50, "tests/e2e/test_replicas.py": 48,
    "tests/e2e/test_retraining_ray.py": 45, "tests/unit/test_retraining_embedding.py": 44,
    "tests/e2e/test_formats.py": 39, "tests/e2e/test_envelopes.py": 36, "tests/e2e/test_openapi.py": 36,
}


def pytest_collection_modifyitems(session, config, items):
    """The slowest files first (SLOW_FILES), the others after them in their own order; the
    tests of a file keep theirs (some build on the one before)."""
    def weight(item) -> int:
        return -SLOW_FILES.get(Path(item.fspath).relative_to(ROOT).as_posix(), 0)

    items.sort(key=weight)  # stable
