"""Model instances: one handler object in its own execution thread.

The event loop never runs a handler. :meth:`ModelInstance.submit` hands a batch to the
instance's thread; the thread runs it with :class:`~server.instances.runner.BatchRunner`
(decode the TorchServe way, ``handle(data, context)``, encode) and reports back on the loop
with ``call_soon_threadsafe``.

A thread cannot be killed: one that hangs past its model's responseTimeout is *abandoned*
(:meth:`ModelInstance.kill` marks it, it never serves again and ends whenever its handler
returns); the registry starts a replacement.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Callable

from server.core import cpus, omp
from server.core.archive import ModelArchive
from server.core.events import event
from server.core.model_config import ModelConfig
from server.core.osthread import instance_thread_name, name_os_thread
from server.core.instance import InstanceStatus, settle_soon
from server.instances.loaded import LoadSignal, raise_unless_ready
from server.core.types import Ticket
from server.instances.runner import BatchRunner, Outcome, declared_specs, load_runner, model_precision

__all__ = ["ModelInstance", "Outcome"]

log = logging.getLogger("osprey.instances")

_ids = itertools.count(9000)


class _Flush:
    """A job: flush the capture, then settle ``future`` on ``loop`` (see flush_capture)."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop, self.future = loop, future


class ModelInstance:
    """One handler object and the thread that runs it."""

    def __init__(self, name: str, version: str, archive: ModelArchive, config: ModelConfig,
                 index: int, gpu_id: int | None, metrics_sink: Callable | None = None,
                 observe: Callable | None = None, envelope: str = ""):
        self.name, self.version, self.archive, self.config = name, version, archive, config
        self.envelope = envelope  # the server's service_envelope (handlers/envelopes.py), '' for none
        self.index = index
        self.id = str(next(_ids))
        self.gpu_id = gpu_id
        self.status = InstanceStatus.LOADING
        self.start_time = time.time()
        self.error: str | None = None
        self.runner: BatchRunner | None = None
        self.on_lost: Callable | None = None  # threads are never lost on their own (see kill)
        self.abandoned = False
        self.pid: int | None = None  # runs in this process
        self._metrics_sink = metrics_sink
        self._observe = observe  # the monitor's observe (called from this instance's thread), or None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=f"osprey-{name}-{version}-{index}", daemon=True)
        # TorchServe's worker name: what this thread prints goes to model_log.log as W-9000-m_1.0-stdout
        self._thread.osprey_worker = f"W-{self.id}-{name}_{version}"  # type: ignore[attr-defined]
        self._loaded = LoadSignal()
        # the model's instances (the registry's list, set when it starts this one): an instance
        # shares the event loop's CPU only while it is the only one (server/core/cpus.py)
        self.siblings: list = [self]
        self.batch_seconds = 0.0  # a moving average of the time a batch takes here
        self.colocated = False  # pinned to the event loop's CPU now
        self._omp_started = False
        self._threads_before = 0  # torch's thread count here before it joined (0: left as it was)

    @property
    def service(self):
        return self.runner.service if self.runner is not None else None

    @property
    def context(self):
        return self.runner.context if self.runner is not None else None

    # --- lifecycle (called from the loop) -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    async def wait_loaded(self, timeout: float) -> None:
        loaded = await self._loaded.until_set(timeout)
        if not loaded:
            self.status = InstanceStatus.FAILED
        raise_unless_ready(self, loaded, timeout)

    def stop(self) -> None:
        if self.status != InstanceStatus.FAILED:
            self.status = InstanceStatus.STOPPED
        self._jobs.put(None)

    def kill(self) -> bool:
        """A thread cannot be killed: abandon it (never serves again; ends when its handler returns)."""
        self.abandoned = True
        if self._thread.is_alive():  # hung, maybe spinning: not on the event loop's CPU
            cpus.release_thread(self._thread.native_id)
        self.status = InstanceStatus.FAILED
        self.error = "abandoned: its handler hung"
        self._jobs.put(None)
        return False

    @property
    def ended(self) -> bool:
        """The thread has finished (or never started): its handler and model are dropped."""
        return self._thread.ident is None or not self._thread.is_alive()

    def release(self) -> None:
        """Drop the handler object (and its model) and the context once the thread has ended."""
        if self.ended:
            self.runner = None
            self.on_lost = None
            self._loaded.forget_waiter()

    @property
    def accepts_tensors(self) -> bool:
        return bool(self.runner and self.runner.accepts_tensors)

    def tensor_specs(self) -> tuple[list | None, list | None]:
        return declared_specs(self.service.target if self.service is not None else None)

    def model_precision(self) -> str | None:
        return model_precision(self.service.target) if self.service is not None else None

    def submit(self, batches: list[list[Ticket]], loop: asyncio.AbstractEventLoop,
               on_done: Callable[["ModelInstance", list, list[list[Outcome]]], None]) -> None:
        """Run ``batches`` one after another; report all their outcomes with one loop callback."""
        self._jobs.put((batches, loop, on_done))

    def flush_capture(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """The feedback barrier (:meth:`server.core.instance.Instance.flush_capture`): a job
        behind the handoffs already queued, so it runs after every batch whose answer has left;
        the thread flushes its capture into the monitor's port and settles the future. Settled
        at once where nothing can be pending: not monitored, not serving (loading: nothing
        answered yet; stopped or failed: the thread flushed or lost it on its way out)."""
        fut = loop.create_future()
        runner = self.runner
        if (self.status != InstanceStatus.READY or self.abandoned or runner is None
                or runner.capture is None or self.ended):
            fut.set_result(None)
        else:
            self._jobs.put(_Flush(loop, fut))
        return fut

    # --- the thread ------------------------------------------------------------------
    def _main(self) -> None:
        name_os_thread(instance_thread_name(self.name, self.index))
        cpus.leave()  # started by the event loop's thread: not on its one CPU
        try:
            self.runner = load_runner(self.name, self.version, str(self.archive.model_dir), self.archive.handler,
                                      self.archive.manifest, self.config, self.gpu_id, self._metrics_sink,
                                      self._observe, self.envelope,
                                      str(self.archive.deps_dir) if self.archive.deps_dir else None, False)
            if self.status == InstanceStatus.LOADING:  # stopped or timed out while loading: it ends below
                self.status = InstanceStatus.READY
                self.load_seconds = time.time() - self.start_time  # TorchServe's WorkerLoadTime
        except BaseException as exc:  # reported at registration, never raised on the loop
            log.exception("model %s instance %d failed to load", self.name, self.index)
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = InstanceStatus.FAILED
        finally:
            self._loaded.set()
        if self.status != InstanceStatus.READY:
            return
        event(log, "instance_started", model=self.name, version=self.version, index=self.index, kind="thread")
        while True:
            wait = self.runner.flush_wait()  # monitoring: batches pending, flush them if no work comes
            try:
                job = self._jobs.get() if wait is None else self._jobs.get(timeout=wait)
            except queue.Empty:  # idle (or the pending batches are due): hand them over now
                self.runner.flush()
                continue
            if job is None:
                self.runner.flush()
                break
            if type(job) is _Flush:  # a feedback barrier: what the answers so far left, to the monitor
                self.runner.flush()
                settle_soon(job.loop, job.future)
                continue
            batches, loop, on_done = job
            t0 = time.perf_counter()
            outcomes = self.runner.run_handoff(batches)
            self._place((time.perf_counter() - t0) / max(1, len(batches)))
            if self.abandoned:
                log.info("model %s version %s: abandoned instance %d returned from its handler and ends",
                         self.name, self.version, self.index)
            try:
                loop.call_soon_threadsafe(on_done, self, batches, outcomes)
            except RuntimeError:  # loop closed during shutdown
                break
            self.runner.flush(force=False)  # monitoring, when enough is pending: after the answers left

    def _place(self, seconds: float) -> None:
        """After a handoff whose batches took ``seconds`` each: join the event loop's CPU while
        batches are short and this is its model's only instance, leave it otherwise. Joined, and
        while its batches are shorter still (``omp.SINGLE_BELOW_S``), it runs torch on one
        thread: a batch that short spread over the cores spends more waking torch's worker than
        it saves (server/core/omp.py); a longer one keeps torch's count, however far it could be
        split."""
        if cpus.pinned_cpu() is None:
            return
        average = self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds if self.batch_seconds else seconds
        alone = len(self.siblings) <= 1
        if not self.colocated and alone and average < cpus.COLOCATE_BELOW_S:
            if not self._omp_started:  # torch's workers keep every CPU, whatever this thread does later
                cpus.start_omp_pool()
                self._omp_started = True
            self.colocated = cpus.join()
        elif self.colocated and (not alone or average > cpus.LEAVE_ABOVE_S):
            cpus.leave()
            self.colocated = False
        single = self.colocated and average < (omp.MULTI_ABOVE_S if self._threads_before else omp.SINGLE_BELOW_S)
        if single and not self._threads_before:
            threads = omp.threads_here()
            if threads > 1 and omp.set_for_this_thread(1):
                self._threads_before = threads
        elif not single and self._threads_before:
            omp.set_for_this_thread(self._threads_before)
            self._threads_before = 0

    def run(self, batch: list[Ticket]) -> list[Outcome]:
        """Handle one batch in the calling thread (the runner's logic; for tests and tools)."""
        outcomes = self.runner.run(batch)
        self.runner.flush()
        return outcomes
