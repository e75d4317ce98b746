"""A real ``redis-server`` for tests (Debian's package), on a free loopback port.

    with RedisProcess(tmp_path) as redis:      # or the ``redis_server`` fixture
        redis.url                               # redis://127.0.0.1:PORT/0
        redis.stop(); redis.start()             # Redis down, then back on the same port
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import free_port
from .prometheus_helpers import require

__all__ = ["RedisProcess", "redis_server"]


class RedisProcess:
    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = require("redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "RedisProcess":
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; "
                                   f"see {self.workdir}/redis-{self.port}.log")
            if self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server for one test."""
    with RedisProcess(tmp_path / "redis") as r:
        yield r
