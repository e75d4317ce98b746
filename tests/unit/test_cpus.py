"""The setting ``interpreter_cpu`` and the CPU claim that keeps two Osprey servers on one
machine off each other's CPU (server/core/cpus.py). What a running server pins is in
tests/e2e/test_interpreter_cpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server.core import cpus
from server.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_setting_takes_auto_off_or_a_cpu_number_and_names_anything_else():
    assert cpus.parse_setting("auto") == "auto"
    assert cpus.parse_setting(" OFF ") == "off"
    assert cpus.parse_setting("1") == 1
    for bad in ("-1", "banana", "1.5", ""):
        with pytest.raises(ValueError, match="interpreter_cpu") as err:
            cpus.parse_setting(bad)
        assert repr(bad) in str(err.value)


def test_the_server_refuses_to_start_with_a_bad_value_or_a_cpu_it_may_not_use(tmp_path):
    with pytest.raises(ValueError, match="interpreter_cpu: 'banana'"):
        load_settings(None, env={"OSPREY_INTERPRETER_CPU": "banana"})
    if hasattr(os, "sched_getaffinity"):
        outside = max(os.sched_getaffinity(0)) + 1
        with pytest.raises(ValueError, match=f"CPU {outside} is not one this server may run on"):
            load_settings(None, env={"OSPREY_INTERPRETER_CPU": str(outside)})
    assert load_settings(None, env={}).interpreter_cpu == "auto"


def test_a_claimed_cpu_is_not_claimed_again_until_its_holder_lets_go(tmp_path):
    cpu_set = frozenset({0, 1, 2})
    first, fd1 = cpus.claim(cpu_set, 1, tmp_path)
    assert first == 1  # the CPU the loop is on, when free
    second, fd2 = cpus.claim(cpu_set, 1, tmp_path)
    assert second == 0  # held: the next free one
    third, fd3 = cpus.claim(cpu_set, None, tmp_path)
    assert third == 2
    assert cpus.claim(cpu_set, 1, tmp_path) == (None, None)  # every one held: nothing to pin
    os.close(fd1)  # the holder ended (a process's descriptors close when it dies, however it dies)
    again, fd4 = cpus.claim(cpu_set, 2, tmp_path)
    assert again == 1
    for fd in (fd2, fd3, fd4):
        os.close(fd)


def test_a_claim_held_by_another_process_counts(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from server.core import cpus; "
         "cpu, fd = cpus.claim(frozenset({0, 1}), 0, Path(sys.argv[1])); print(cpu, flush=True); sys.stdin.read()",
         str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "0"
        cpu, fd = cpus.claim(frozenset({0, 1}), 0, tmp_path)
        assert cpu == 1
        os.close(fd)
    finally:
        holder.stdin.close()
        holder.wait(10)
    cpu, fd = cpus.claim(frozenset({0, 1}), 0, tmp_path)  # it ended: its claim with it
    assert cpu == 0
    os.close(fd)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least 2 CPUs")
def test_a_child_started_on_one_cpu_takes_back_the_cpus_its_server_had():
    everyone = sorted(os.sched_getaffinity(0))
    code = ("import os; from server.core.cpus import restore_inherited; before = sorted(os.sched_getaffinity(0)); "
            "restore_inherited(); print(before, sorted(os.sched_getaffinity(0)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), cpus.ENV: ",".join(map(str, everyone))}

    def on_one_cpu():  # as if started from a thread pinned to one CPU
        os.sched_setaffinity(0, {everyone[0]})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, preexec_fn=on_one_cpu,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"[{everyone[0]}] {everyone}"
    env.pop(cpus.ENV)  # not started by a pinned server: left as it is
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, preexec_fn=on_one_cpu,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"[{everyone[0]}] [{everyone[0]}]"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least 2 CPUs")
def test_overlapping_child_starts_on_the_event_loop_leave_it_pinned():
    """Two children started at once (two front ends restarted together, two models' requirements
    installed): the loop is inside two ``unpinned()`` blocks at the same time, each around an
    ``await``; when both are over the loop is on its one CPU again, and inside them it had every CPU."""
    cpu = max(os.sched_getaffinity(0))
    code = f"""
import asyncio, os
from server.core import cpus
assert cpus.pin_interpreter({cpu}) == {cpu}
seen = []
first_in, second_in, first_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

async def first():
    with cpus.unpinned():
        seen.append(sorted(os.sched_getaffinity(0)))
        first_in.set()
        await second_in.wait()  # both blocks open
    first_out.set()

async def second():
    await first_in.wait()
    with cpus.unpinned():
        second_in.set()
        await first_out.wait()  # the first block closed, this one still open
        seen.append(sorted(os.sched_getaffinity(0)))

async def main():
    await asyncio.gather(first(), second())

asyncio.run(main())
print(seen, sorted(os.sched_getaffinity(0)))
"""
    everyone = sorted(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"{[everyone] * 2} [{cpu}]"


def test_a_claim_file_that_is_not_a_regular_file_never_blocks_the_start(tmp_path):
    """Anyone can put a FIFO where a claim file goes; opening it as a file would wait forever
    for a writer, and the server would never become ready."""
    os.mkfifo(tmp_path / f"{cpus.LOCK_PREFIX}0.lock")
    got = []
    worker = threading.Thread(target=lambda: got.append(cpus.claim(frozenset({0, 1}), 0, tmp_path)), daemon=True)
    worker.start()
    worker.join(30)
    assert got, "the claim blocked on a FIFO"
    cpu, fd = got[0]
    assert (cpu, fd is not None) == (1, True)  # CPU 0's file is unusable: the next one
    os.close(fd)
    both = tmp_path / "both"
    both.mkdir()
    for cpu in (0, 1):
        os.mkfifo(both / f"{cpus.LOCK_PREFIX}{cpu}.lock")
    assert cpus.claim(frozenset({0, 1}), 0, both) == (0, None)  # none lockable: used unclaimed


def test_off_drops_the_cpus_an_osprey_server_above_recorded(monkeypatch):
    monkeypatch.setenv(cpus.ENV, "0,1,2,3")
    cpus.export_process_cpus("off")
    assert cpus.ENV not in os.environ  # its children keep what they are given (a taskset, say)
    if cpus.allowed_cpus():
        cpus.export_process_cpus("auto")
        assert os.environ[cpus.ENV] == ",".join(map(str, sorted(cpus.allowed_cpus())))
