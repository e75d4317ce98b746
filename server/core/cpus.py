"""One CPU for the serving interpreter's busy threads (setting ``interpreter_cpu``).

The event loop and a small model's instance thread take turns holding the GIL: the instance
thread lets it go for each torch call, the loop takes it, and the instance thread waits to
get it back. On two CPUs each such handoff wakes a thread on the other CPU, and the waker
then waits for that thread in turn. On one CPU the thread that let the GIL go for a few
microseconds simply goes on running, and the objects both threads touch stay in one CPU's
cache. Measured on 2 CPUs (benchmarks/CHANGES.md, session 22): at 32 clients the tiny MLP answered 11%
more requests batched and 35% more unbatched, digits_cnn 40% more.

So, once the server is ready, the event loop's thread is pinned to one CPU, and each thread
instance whose batches are short (``COLOCATE_BELOW_S``) joins it there while it is its model's
only instance. A model whose batches are long, or that runs several instances to compute in
parallel, keeps every CPU. torch's OpenMP workers are never pinned: an instance thread starts
them before it joins (they would inherit its CPU), so a forward pass still spreads over
the cores.

Threads and processes inherit their creator's CPUs. An instance thread started later starts on
every CPU the process had (:func:`leave`); child processes are given them (:func:`unpinned` around the start) and, for Osprey's own, again at their entry
(:func:`restore_inherited`, from :data:`ENV`).

``auto`` (the default) picks the CPU the loop runs on, unless another Osprey server on this
machine has claimed it (a lock file per CPU in ``/dev/shm``); then another free one; with
every allowed CPU claimed, or fewer than two allowed, nothing is pinned. ``off``: the system
places every thread. A number: that CPU, claimed or not.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path

__all__ = ["ENV", "COLOCATE_BELOW_S", "LEAVE_ABOVE_S", "parse_setting", "allowed_cpus", "current_cpu", "claim",
           "pin_interpreter", "pinned_cpu", "join", "leave", "release_thread", "unpinned", "restore_inherited",
           "export_process_cpus", "start_omp_pool"]

log = logging.getLogger("osprey.cpus")

ENV = "OSPREY_PROCESS_CPUS"  # the CPUs the server had before its loop was pinned (children restore them)
COLOCATE_BELOW_S = 0.005  # an instance thread joins the loop's CPU while its batches take less than this
LEAVE_ABOVE_S = 0.010  # ... and leaves it once they take more than this (hysteresis)
LOCK_PREFIX = "osprey-cpu-"

_pinned: int | None = None  # the loop's CPU once pinned
_process_cpus: frozenset[int] = frozenset()  # the process's CPUs before the pin
_lock_fd: int | None = None  # the claim, held for the life of the process

_getcpu = None
if sys.platform.startswith("linux"):
    try:
        _getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        pass


def parse_setting(value: str) -> str | int:
    """``auto``, ``off`` or a CPU number (ValueError naming the value otherwise)."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        cpu = int(text)
    except ValueError:
        cpu = -1
    if cpu < 0:
        raise ValueError(f"setting interpreter_cpu: {value!r} must be auto, off or a CPU number (0, 1, ...)")
    return cpu


def allowed_cpus() -> frozenset[int]:
    """The CPUs the calling thread may run on (empty where the system cannot say)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset()


def current_cpu() -> int | None:
    """The CPU the calling thread runs on now, or None."""
    if _getcpu is None:
        return None
    cpu = _getcpu()
    return cpu if cpu >= 0 else None


def _lock_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _open_lock(path: Path) -> int | None:
    """A descriptor on ``path`` to flock; None when it cannot be opened. An existing file is opened
    read-only without O_CREAT (another user's file, in a sticky /dev/shm with protected_regular,
    refuses O_CREAT), a new one is made readable by every user. Never blocks (a FIFO put there
    would block a plain open): anything but a regular file counts as unopenable."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        try:
            fd = os.open(path, flags | os.O_CREAT, 0o644)
            os.fchmod(fd, 0o644)
        except OSError:
            return None
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return fd


def claim(cpus: frozenset[int], preferred: int | None, lock_dir: Path | None = None) -> tuple[int | None, int | None]:
    """The first CPU of ``cpus`` (``preferred`` first) that no other process holds the lock
    file of, and the open descriptor that holds it now; (None, None) when every one is held. A
    lock file that cannot be opened at all does not count as held (its CPU is taken unclaimed
    only when no CPU can be claimed)."""
    lock_dir = lock_dir or _lock_dir()
    order = sorted(cpus)
    if preferred in cpus:
        order.remove(preferred)
        order.insert(0, preferred)
    unlockable = None
    for cpu in order:
        fd = _open_lock(lock_dir / f"{LOCK_PREFIX}{cpu}.lock")
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cpu, fd
        except BlockingIOError:  # held by another server
            os.close(fd)
            continue
        except OSError:  # cannot lock here at all (e.g. a network file system)
            os.close(fd)
        if unlockable is None:
            unlockable = cpu
    if unlockable is not None:
        log.warning("interpreter_cpu: cannot open or lock the CPU claim files in %s; CPU %d is used unclaimed",
                    lock_dir, unlockable)
    return unlockable, None


def pin_interpreter(setting: str | int) -> int | None:
    """Pin the calling thread (the event loop's) to one CPU as ``setting`` says; the CPU, or None
    when nothing was pinned (``off``, one CPU, every CPU claimed, or the system refused). ValueError
    when a CPU number is not one this process may use."""
    global _pinned, _process_cpus, _lock_fd
    mode = parse_setting(setting) if isinstance(setting, str) else setting
    cpus = allowed_cpus()
    if mode == "off" or len(cpus) < 2:
        return None
    if isinstance(mode, int):
        if mode not in cpus:
            raise ValueError(f"setting interpreter_cpu: CPU {mode} is not one this server may run on "
                             f"({', '.join(map(str, sorted(cpus)))})")
        cpu = mode
        _, fd = claim(frozenset({mode}), mode)  # held or not, it is the CPU named; auto servers avoid it
    else:
        cpu, fd = claim(cpus, current_cpu())
        if cpu is None:
            log.info("interpreter_cpu auto: every CPU this server may use (%s) is claimed by another Osprey "
                     "server; no thread is pinned", ",".join(map(str, sorted(cpus))))
            return None
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.warning("interpreter_cpu: the system refused to pin the event loop to CPU %d (%s); no thread is "
                    "pinned", cpu, exc)
        if fd is not None:
            os.close(fd)
        return None
    _pinned, _process_cpus, _lock_fd = cpu, cpus, fd
    return cpu


def pinned_cpu() -> int | None:
    return _pinned


def _set(cpu_set) -> bool:
    try:
        os.sched_setaffinity(0, cpu_set)
        return True
    except OSError as exc:  # e.g. the CPU went offline, or the container's CPU set shrank meanwhile
        log.warning("could not set this thread's CPUs to %s: %s", ",".join(map(str, sorted(cpu_set))), exc)
        return False


def join() -> bool:
    """Pin the calling thread to the loop's CPU; False when the loop is not pinned or the system
    refused. A refusal ends joining for every thread (logged once): the loop's CPU is gone."""
    global _pinned
    if _pinned is None:
        return False
    if _set({_pinned}):
        return True
    log.warning("interpreter_cpu: CPU %d refused; instance threads no longer join the event loop's CPU", _pinned)
    _pinned = None
    return False


def leave() -> None:
    """Give the calling thread every CPU the process had before the pin (a thread inherits
    its creator's; one started by the pinned loop would otherwise stay on the loop's CPU).
    Never raises (it is a thread pool's initializer)."""
    if _process_cpus and allowed_cpus() != _process_cpus:
        _set(_process_cpus)


def release_thread(native_id: int | None) -> None:
    """Give another thread of this process (by its system id) every CPU the process had: an
    instance thread abandoned while it hangs must not keep the loop's CPU."""
    if not native_id or not _process_cpus:
        return
    try:
        os.sched_setaffinity(native_id, _process_cpus)
    except OSError:  # it has ended
        pass


_depth = threading.local()


@contextlib.contextmanager
def unpinned():
    """Around starting a child process from a pinned thread: the calling thread has every CPU
    the process had meanwhile, so the child (and anything multiprocessing starts with it, a fork
    server, a resource tracker) inherits them; then it is pinned again. Blocks may overlap on the
    event loop (an ``await`` inside one): only the outermost one pins again."""
    if _pinned is None or not _process_cpus:
        yield
        return
    depth = getattr(_depth, "n", 0)
    if depth == 0:
        _depth.before = allowed_cpus()
        _set(_process_cpus)
    _depth.n = depth + 1
    try:
        yield
    finally:
        _depth.n -= 1
        if _depth.n == 0 and _depth.before and _depth.before != _process_cpus:
            _set(_depth.before)


def restore_inherited() -> None:
    """At a child process's entry: the CPUs its server had (:data:`ENV`), if it was started from
    a thread pinned to one; nothing otherwise."""
    text = os.environ.get(ENV)
    if not text:
        return
    try:
        cpus = {int(c) for c in text.split(",") if c}
        if cpus and set(os.sched_getaffinity(0)) != cpus:
            os.sched_setaffinity(0, cpus)
    except (ValueError, OSError, AttributeError):
        pass


def export_process_cpus(setting: str | int) -> None:
    """Record the CPUs this process may use in :data:`ENV`, for children to restore: once, at the
    start, before any thread runs (setting the environment later races other threads' getenv).
    With ``off`` none is recorded, and one inherited from an Osprey server above is dropped."""
    cpus = allowed_cpus()
    if str(setting).strip().lower() == "off" or not cpus:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = ",".join(map(str, sorted(cpus)))


def start_omp_pool() -> None:
    """Start torch's OpenMP workers from the calling thread while it still has every CPU: an
    OpenMP team is made at its first parallel region and its threads inherit the CPUs of the
    thread that made it. One region as wide as torch's thread count (32,768 elements a task).
    Pools a handler starts later from a joined thread (torch's inter-op pool for
    ``torch.jit.fork``, a handler's own threads) share the loop's CPU."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        threads = torch.get_num_threads()
        if threads > 1:
            torch.empty(32768 * threads).fill_(0.0)
    except Exception:  # never fail an instance for this
        log.debug("could not start torch's OpenMP workers", exc_info=True)
