"""monitoring.remote.RemoteMonitor against a real monitor process (monitoring.process): what
happens when an answer comes late, when a client fails the socket's handshake, and how the
restart backoff grows. No server: the monitor process is started by the RemoteMonitor itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Client
from types import SimpleNamespace

import pytest

from monitoring import remote
from monitoring.remote import RemoteMonitor
from server.core.capture import VersionRef
from server.core.errors import OspreyError
from server.settings import Settings


@pytest.fixture
def monitor(tmp_path):
    m = RemoteMonitor(Settings(model_store=str(tmp_path)), lambda model, version: None)
    assert m.drain(60)  # the process is up and answers
    yield m
    m.close()


def _up(text: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("osprey_monitor_process_up ")))


def test_an_answer_that_comes_after_its_caller_gave_up_leaves_the_monitor_working(monitor, monkeypatch):
    """A scrape that times out while the process cannot answer (stopped here) answers up 0;
    its late answer is dropped, and the next calls are answered as before."""
    monkeypatch.setattr(remote, "SCRAPE_TIMEOUT_S", 0.2)
    os.kill(monitor.pid, signal.SIGSTOP)
    try:
        text = asyncio.run(monitor.exposition())
        assert _up(text) == 0
        assert "osprey_monitoring_dropped_total 0" in text
    finally:
        os.kill(monitor.pid, signal.SIGCONT)
    assert monitor.drain(30)  # the late "render" answer came first and was dropped, not fatal
    assert _up(asyncio.run(monitor.exposition())) == 1
    assert monitor.restarts == 0 and not monitor._calls


def test_a_client_that_fails_the_handshake_does_not_stop_the_socket(monitor):
    """A connection that leaves mid-handshake, and one with the wrong key, are refused; a
    process instance's child connecting after them is served."""
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(monitor.address)
    raw.close()
    with pytest.raises(Exception):
        Client(monitor.address, family="AF_UNIX", authkey=b"wrong key")
    connected = []

    def child():
        conn = Client(monitor.address, family="AF_UNIX", authkey=monitor.authkey)
        conn.send(("version", VersionRef("m", "1", SimpleNamespace(), "/nowhere")))
        connected.append(conn)
    t = threading.Thread(target=child, daemon=True)
    t.start()
    t.join(30)
    assert connected, "a good client could not connect after a bad one"
    connected[0].close()
    assert monitor.drain(30)


def test_calls_fail_at_once_with_a_clear_error_while_the_process_is_down(monitor):
    old = monitor.pid
    os.kill(old, signal.SIGKILL)
    # the reader sees the exit; until the next start (at least 1 s later) calls fail, naming it
    deadline = time.monotonic() + 30
    while monitor._state != "down":
        assert time.monotonic() < deadline, "the exit was never seen"
        time.sleep(0.01)
    with pytest.raises(OspreyError) as info:
        monitor.status("m", "1")
    assert info.value.status == 503
    assert f"the monitor process (pid {old}) exited with code -9" in info.value.message


def test_restart_backoff_doubles_while_starts_fail_and_resets_after_a_stable_run():
    m = SimpleNamespace(restart_backoff=1.0, _backoff=1.0, _started_at=0.0, _retry_at=0.0)
    waits = []
    for started in (100.0, 0.0, 0.0, 0.0):  # a process that ran long, then three failed starts
        m._started_at = started and (remote.time.monotonic() - remote.STABLE_S - started)
        RemoteMonitor._back_off(m)
        waits.append(round(m._retry_at - remote.time.monotonic()))
    assert waits == [1, 2, 4, 8]
