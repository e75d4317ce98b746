"""A real ``osprey worker`` process on a Redis job queue and a model store, for the tests.

Its output goes to ``worker-NAME.log`` in ``root``; ``wait_ready`` polls that log for the
worker's ready line; ``stop`` sends SIGTERM (the worker's drain) and kills it after
``timeout`` seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["WorkerProcess"]


class WorkerProcess:
    def __init__(self, root: Path, redis_url: str, store: Path, name: str, *, concurrency: int = 1,
                 env: dict | None = None):
        self.name = name
        self.log_path = root / f"worker-{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "worker", "--redis", redis_url, "--model-store", str(store),
             "--concurrency", str(concurrency)],
            cwd=root, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> "WorkerProcess":
        deadline = time.monotonic() + timeout
        while b"Osprey worker ready" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for worker {self.name} to start:\n"
                                     f"{self.log_path.read_text()}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
