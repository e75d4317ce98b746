"""A real local Ray head for tests (``ray[default]`` from PyPI, in a virtualenv of its own: its pins
clash with Osprey's), every port of it a free loopback port.

    python = ray_python()                  # None: skip (OSPREY_RAY_PYTHON, or .venv-ray/bin/python)
    with RayHead(tmp_path, python) as ray:
        ray.address                         # the dashboard (its Jobs API): http://127.0.0.1:PORT
        ray.processes()                     # the head's processes and their children (jobs included)

Ray binds to the address it is given (``--node-ip-address=127.0.0.1``), but a process that works
out its node address by itself uses the machine's own interface address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; both are set here and passed to the jobs' processes.
The head is stopped by signalling its own processes (by pid, SIGTERM then SIGKILL), not with
``ray stop``, which stops every Ray process of the user on the machine.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from .conftest import ROOT, free_port

__all__ = ["RayHead", "ray_python", "LOOPBACK_ENV", "non_loopback"]

WORKER_PORTS = 40  # Ray worker processes the head may run at once (job supervisors, idle workers)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_python() -> str | None:
    """The Python of the Ray virtualenv (``make test`` creates it), or None."""
    for candidate in (os.environ.get("OSPREY_RAY_PYTHON"), str(ROOT / ".venv-ray" / "bin" / "python")):
        if candidate and Path(candidate).is_file() and (Path(candidate).parent / "ray").is_file():
            return candidate
    return None


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def non_loopback(procs) -> list[str]:
    """Every socket of these processes (listening or connected) with an end off loopback."""
    bad = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            for end in (c.laddr, c.raddr):
                if end and not _loopback(end.ip):
                    bad.append(f"{name} (pid {p.pid}): {c.laddr} -> {c.raddr or '-'} {c.status}")
    return bad


class RayHead:
    def __init__(self, workdir: Path, python: str):
        self.python = python
        self.ray = str(Path(python).parent / "ray")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay short (AF_UNIX: 107 bytes): a temp dir of its own under /tmp
        self.temp_dir = tempfile.mkdtemp(prefix="ospray-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = self.workdir / "ray-start.log"
        self._pids: set[int] = set()

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH"))}
        return {**env, **LOOPBACK_ENV}

    def start(self, timeout: float = 180.0) -> "RayHead":
        ports = {"--port": self.gcs_port, "--dashboard-port": self.dashboard_port,
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
                 "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port()}
        cmd = [self.ray, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", "--num-cpus=2", "--object-store-memory=80000000",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats", "--log-style=record",
               *[f"{k}={v}" for k, v in ports.items()],
               # workers' ports: free ones too (Ray's default range would overlap those above)
               "--worker-port-list=" + ",".join(str(free_port()) for _ in range(WORKER_PORTS))]
        with open(self.log_path, "ab") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir,
                                  timeout=timeout)
        self._pids = {p.pid for p in self._own()}
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start exited with {done.returncode}: {self.log_path.read_text()[-3000:]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the Jobs API answers once the job agent is up too
            try:
                if httpx.get(f"{self.address}/api/jobs/", timeout=5, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Ray dashboard at {self.address} did not answer within {timeout} s")

    def _own(self) -> list[psutil.Process]:
        """The head's processes (those naming its temp dir or GCS port) and their descendants."""
        marks = (self.temp_dir, f"127.0.0.1:{self.gcs_port}")
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            cmdline = p.info.get("cmdline") or []
            if any(m in part for part in cmdline for m in marks):
                roots.append(p)
        found = {}
        for r in roots:
            try:
                for p in [r, *r.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def processes(self) -> list[psutil.Process]:
        procs = self._own()
        self._pids |= {p.pid for p in procs}
        return procs

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(procs, timeout=5)
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
