"""benchmarks.monitoring_cost splits a server's CPU time by the role of each thread."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks.monitoring_cost import _roles, _thread_cpu
from server.core.osthread import instance_thread_name, name_os_thread

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_threads_are_read_by_role_from_their_system_names():
    named, done = threading.Event(), threading.Event()

    def instance():
        name_os_thread(instance_thread_name("mlp", 0))
        named.set()
        done.wait(10)

    t = threading.Thread(target=instance)
    t.start()
    try:
        assert named.wait(10)
        roles = {tid: role for tid, (role, _) in _thread_cpu(os.getpid()).items()}
        assert roles[str(os.getpid())] == "loop"  # the process's main thread: the event loop's
        assert roles[str(t.native_id)] == "instance"
    finally:
        done.set()
        t.join()


def test_cpu_per_request_by_role_leaves_out_threads_that_ended_and_counts_new_ones_whole():
    before = {"1": ("loop", 1.0), "2": ("instance", 2.0), "3": ("other", 5.0)}
    after = {"1": ("loop", 1.5), "2": ("instance", 2.25), "4": ("monitor", 0.1)}  # 3 ended, 4 started
    assert _roles(before, after, 1000) == {"loop": 500.0, "instance": 250.0, "monitor": 100.0, "other": 0.0,
                                           "monitor_process": 0.0, "child_processes": 0.0}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_descendant_processes_count_the_monitor_process_apart_from_the_instances_children():
    """A monitor process (named osprey-monitord, as monitoring.process names itself) and a
    process instance's child (a grandchild, as forkserver makes them) are both read."""
    script = ("import sys, subprocess; from server.core.osthread import name_os_thread; "
              "name_os_thread(sys.argv[1]); "
              "kid = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE) "
              "if sys.argv[1] == 'forkserver' else None; "
              "print('ready', kid.pid if kid else 0, flush=True); sys.stdin.read(); kid and kid.stdin.close()")
    procs = [subprocess.Popen([sys.executable, "-c", script, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT) for name in ("osprey-monitord", "forkserver")]
    try:
        pids = [p.stdout.readline().split() for p in procs]
        grandchild = pids[1][1]
        roles = {tid: role for tid, (role, _) in _thread_cpu(os.getpid()).items()}
        assert roles[f"process {procs[0].pid}"] == "monitor_process"
        assert roles[f"process {procs[1].pid}"] == "child_processes"
        assert roles[f"process {grandchild}"] == "child_processes"
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(10)
