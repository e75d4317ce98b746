"""The event loop and a small model's instance thread share one CPU (setting ``interpreter_cpu``),
against a real server: what is pinned, and everything that must keep every CPU (torch's
OpenMP workers, a model with long batches or several instances, child processes started after
the pin, ``off``). See server/core/cpus.py for why.

The tests name the CPU (a number): ``auto`` claims a CPU no other Osprey server on the machine
holds, and the suite's other servers may hold them all (tests/unit/test_cpus.py covers the
claim)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.gates import wait_until
from tests.models import handler_archive

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux and at least 2 CPUs")

QUICK = '''
def handle(data, context):
    if data is None:
        return None
    return ["ok" for _ in data]
'''

SLOW = '''
import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(0.03)  # a batch far longer than the 5 ms under which an instance joins the loop
    return ["ok" for _ in data]
'''


def _cpus(pid: int, tid: int | str | None = None) -> set[int] | None:
    """The CPUs a thread may run on; None when it has ended meanwhile."""
    try:
        status = Path(f"/proc/{pid}/task/{tid or pid}/status").read_text()
    except OSError:
        return None
    text = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list:")).split(":", 1)[1]
    out: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _threads(pid: int, comm: str | None = None) -> list[int]:
    """The thread ids named ``comm`` (every thread: None), oldest first by start time (torch's
    OpenMP workers take the name of the instance thread that started them)."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # the process ended meanwhile
        return []
    for tid in tids:
        try:
            if comm is None or Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == comm:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                found.append((int(stat[stat.rindex(")") + 2:].split()[19]), int(tid)))
        except OSError:  # it ended meanwhile
            pass
    return [tid for _, tid in sorted(found)]


def _joins(srv, model: str, pid: int, cpu: int) -> bool:
    """One more request to ``model``; True once its instance thread is on ``cpu`` (it joins when
    its batches' moving average falls under 5 ms: a slow first batch takes a few more)."""
    _predict(srv, model, 1)
    return _cpus(pid, _threads(pid, f"i:{model}:0")[0]) == {cpu}


def _predict(srv, model: str, n: int = 5) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            r = client.post(f"{srv.inference}/predictions/{model}", content=b"1")
            assert r.status_code == 200, r.text


def _cpu() -> int:
    return max(os.sched_getaffinity(0))


def test_the_loop_and_a_small_models_instance_share_one_cpu_and_torchs_workers_keep_every_cpu(osprey, store):
    handler_archive(store, "quick", QUICK, config={"batchSize": 1})
    everyone = set(os.sched_getaffinity(0))
    cpu = _cpu()
    srv = osprey(["quick=quick.mar"], store, config={"interpreter_cpu": cpu, "torch_threads": 2})
    pid = srv.proc.pid
    assert _cpus(pid) == {cpu}  # the event loop, from the moment the server is ready
    assert f"event loop pinned to CPU {cpu}" in srv.log()
    wait_until(lambda: _joins(srv, "quick", pid, cpu), timeout=30, what="the instance thread on the loop's CPU")
    instance, *workers = _threads(pid, "i:quick:0")
    assert workers, "torch started no OpenMP worker (torch_threads 2)"
    for tid in workers:  # torch's OpenMP workers: started before the instance joined the loop
        assert _cpus(pid, tid) == everyone, f"OpenMP worker {tid} was pinned"
    monitor = _threads(pid, "osprey-monitor")
    assert monitor and all(_cpus(pid, tid) == everyone for tid in monitor)


def test_a_model_with_long_batches_keeps_every_cpu(osprey, store):
    handler_archive(store, "quick", QUICK, config={"batchSize": 1})
    handler_archive(store, "slow", SLOW, config={"batchSize": 1})
    everyone = set(os.sched_getaffinity(0))
    cpu = _cpu()
    srv = osprey(["quick=quick.mar", "slow=slow.mar"], store, config={"interpreter_cpu": cpu})
    pid = srv.proc.pid
    _predict(srv, "slow")
    wait_until(lambda: _joins(srv, "quick", pid, cpu), timeout=30, what="the quick model's instance on the loop's CPU")
    _predict(srv, "slow")
    assert _cpus(pid, _threads(pid, "i:slow:0")[0]) == everyone


def test_a_model_running_several_instances_keeps_every_cpu(osprey, store):
    handler_archive(store, "pair", QUICK, config={"batchSize": 1, "minWorkers": 2, "maxWorkers": 2})
    everyone = set(os.sched_getaffinity(0))
    cpu = _cpu()
    srv = osprey(["pair=pair.mar"], store, config={"interpreter_cpu": cpu})
    pid = srv.proc.pid
    assert _cpus(pid) == {cpu}
    _predict(srv, "pair", 10)
    instances = [_threads(pid, f"i:pair:{i}")[0] for i in (0, 1)]
    assert all(_cpus(pid, tid) == everyone for tid in instances)


def test_a_process_instance_started_after_the_pin_gets_every_cpu(osprey, store):
    handler_archive(store, "child", QUICK, config={"batchSize": 1, "isolation": "process"})
    everyone = set(os.sched_getaffinity(0))
    cpu = _cpu()
    srv = osprey([], store, config={"interpreter_cpu": cpu})
    assert _cpus(srv.proc.pid) == {cpu}
    with httpx.Client(timeout=60) as client:  # registered from the pinned event loop's thread
        r = client.post(f"{srv.management}/models", params={"url": "child.mar", "initial_workers": 1,
                                                             "synchronous": "true"})
        assert r.status_code == 200, r.text
    _predict(srv, "child")
    children = _descendants(srv.proc.pid)
    assert children, "no child process"
    for child in children:
        for tid in _threads(child):
            assert _cpus(child, tid) in (everyone, None), f"child {child} thread {tid} inherited the loop's CPU: " + open(f"/proc/{child}/cmdline").read().replace("\0", " ")


def _descendants(pid: int) -> list[int]:
    parents = {int(p): _parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, todo = [], [pid]
    while todo:
        top = todo.pop()
        kids = [p for p, parent in parents.items() if parent == top]
        found += kids
        todo += kids
    return found


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_off_pins_nothing(osprey, store):
    handler_archive(store, "quick", QUICK, config={"batchSize": 1})
    everyone = set(os.sched_getaffinity(0))
    srv = osprey(["quick=quick.mar"], store, config={"interpreter_cpu": "off"})
    _predict(srv, "quick")
    pid = srv.proc.pid
    assert _cpus(pid) == everyone
    assert _cpus(pid, _threads(pid, "i:quick:0")[0]) == everyone
    assert "event loop pinned" not in srv.log()


def test_a_model_registered_after_the_pin_starts_its_torch_workers_on_every_cpu(osprey, store):
    """Its instance thread is started by the pinned loop's thread (and would inherit its CPU, and
    so would torch's OpenMP workers it starts); it starts on every CPU and joins the loop's later."""
    handler_archive(store, "late", QUICK, config={"batchSize": 1})
    everyone = set(os.sched_getaffinity(0))
    cpu = _cpu()
    srv = osprey([], store, config={"interpreter_cpu": cpu, "torch_threads": 2})
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{srv.management}/models", params={"url": "late.mar", "initial_workers": 1,
                                                             "synchronous": "true"})
        assert r.status_code == 200, r.text
    pid = srv.proc.pid
    wait_until(lambda: _joins(srv, "late", pid, cpu), timeout=30, what="the instance thread on the loop's CPU")
    instance, *workers = _threads(pid, "i:late:0")
    assert workers, "torch started no OpenMP worker (torch_threads 2)"
    # every other thread keeps every CPU: torch's workers, the executor threads that extracted the
    # archive (started by the loop's thread after the pin), the monitor, grpc's
    for tid in _threads(pid):
        if tid not in (pid, instance):
            assert _cpus(pid, tid) in (everyone, None), \
                f"thread {tid} ({Path(f'/proc/{pid}/task/{tid}/comm').read_text().strip()}) is on the loop's CPU"


THREADS = '''
import ctypes
import os
import time

import torch

_MKL = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                   mode=os.RTLD_NOLOAD | os.RTLD_LAZY)


def handle(data, context):
    """Answers the torch (OpenMP) and MKL thread counts of the thread running the batch;
    a body "slow" makes the batch long."""
    if data is None:
        return None
    if any(bytes(r.get("body") or b"") == b"slow" for r in data):
        time.sleep(0.03)
    return [f"{torch.get_num_threads()} {_MKL.MKL_Get_Max_Threads()}" for _ in data]
'''


def _counts(srv, model: str, body: bytes = b"1") -> str:
    r = httpx.post(f"{srv.inference}/predictions/{model}", content=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


def test_a_small_model_on_the_loops_cpu_runs_torch_on_one_thread_and_nothing_else_changes(osprey, store):
    """Joined to the loop's CPU, an instance runs torch (OpenMP and MKL) on one thread: a short
    batch spread over the cores spends more waking torch's worker than it saves. Leaving, it
    gets them back; a model that keeps every CPU, and one registered later, keep torch's count."""
    handler_archive(store, "small", THREADS, config={"batchSize": 1})
    handler_archive(store, "long", THREADS, config={"batchSize": 1})
    handler_archive(store, "later", THREADS, config={"batchSize": 1})
    cpu = _cpu()
    srv = osprey(["small=small.mar", "long=long.mar"], store, config={"interpreter_cpu": cpu, "torch_threads": 2})
    pid = srv.proc.pid
    assert _counts(srv, "small") == "2 2"  # (its first batch: before it joined)
    wait_until(lambda: _joins(srv, "small", pid, cpu), timeout=30, what="the small model's instance on the loop's CPU")
    # (once its batches' moving average is under 1 ms: a loaded machine may slow the first ones)
    wait_until(lambda: _counts(srv, "small") == "1 1", timeout=30, what="the joined instance on one torch thread")
    for _ in range(3):
        assert _counts(srv, "long", b"slow") == "2 2"
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{srv.management}/models", params={"url": "later.mar", "initial_workers": 1,
                                                             "synchronous": "true"})
        assert r.status_code == 200, r.text
    assert _counts(srv, "later", b"slow") == "2 2"
    # long batches make the small model's instance leave the loop's CPU, with torch's count back
    wait_until(lambda: _counts(srv, "small", b"slow") == "2 2" and _cpus(pid, _threads(pid, "i:small:0")[0]) != {cpu},
               timeout=30, what="the small model's instance to leave the loop's CPU, its threads back")
