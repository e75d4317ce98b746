"""What the core needs of a model instance, and nothing of how it runs.

An instance loads one model version and runs the batches the batcher hands it. The core
(registry, batcher) knows instances only through :class:`Instance`; which kind runs (a
thread in this process, a child process) is decided by the :data:`InstanceFactory` the
server hands the registry. Implementations live in ``server/instances/``.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from server.core.archive import ModelArchive
    from server.core.model_config import ModelConfig
    from server.core.types import Ticket

__all__ = ["Instance", "InstanceFactory", "InstanceStatus", "DoneCallback", "settle_soon"]


class InstanceStatus(str, enum.Enum):
    """An instance's state; the values are TorchServe's worker states where it has them."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    def __str__(self) -> str:
        return self.value


# called on the loop once a handoff has run: (instance, batches, outcomes per batch)
DoneCallback = Callable[["Instance", list, list], None]


class Instance(Protocol):
    id: str
    index: int
    gpu_id: int | None
    status: InstanceStatus
    start_time: float
    error: str | None
    pid: int | None  # the process that runs it (None: this one)
    # set by the registry before start(): call on the loop when the instance is gone on its own
    # (a child process died); the argument is why (exit status, signal)
    on_lost: Callable[["Instance", str], None] | None

    def start(self) -> None:
        """Begin loading (returns at once)."""

    async def wait_loaded(self, timeout: float) -> None:
        """Wait until loaded; raise OspreyError if it failed, was stopped or took too long."""

    def submit(self, batches: list[list["Ticket"]], loop: asyncio.AbstractEventLoop,
               on_done: DoneCallback) -> None:
        """Run ``batches`` one after another; then ``loop.call_soon_threadsafe(on_done, self, batches,
        outcomes)`` once with all outcomes. ``loop`` may be a stand-in with only that method (the
        batcher's, which may run ``on_done`` before the loop's next iteration)."""

    def flush_capture(self, loop: asyncio.AbstractEventLoop) -> "asyncio.Future | None":
        """A barrier for feedback joins: hand the monitor what was captured from every batch
        this instance answered before the call (monitoring's capture is amortized and waits
        up to half a second), then settle the returned future on ``loop``. Its result: None,
        or a mark a monitor in its own process must have read before the join (what a process
        instance's child sends there travels on a link of its own, in no order with the
        server's calls). None instead of a future: the instance cannot promise that order; the
        join then waits as it would without a barrier."""

    def stop(self) -> None:
        """Stop after the batch it is running (if any); never serves again."""

    def kill(self) -> bool:
        """End it now (it hung): True if it is gone (a process, killed); False if it can only be
        abandoned (a thread: marked, never serves again, ends when its handler returns)."""

    @property
    def ended(self) -> bool:
        """Everything it held (threads, processes, the model) is gone."""

    def release(self) -> None:
        """Once ended: drop the handler, model and context it still refers to (the registry
        calls it after a removal, so a kept reference to the instance keeps nothing big)."""

    @property
    def accepts_tensors(self) -> bool:
        """Its handler takes protocol tensors as they are."""

    def tensor_specs(self) -> tuple[list | None, list | None]:
        """(inputs, outputs) the loaded handler declares, or None where it declares none."""

    def model_precision(self) -> str | None:
        """The loaded model's parameter dtype (fp32, fp16, bf16, int8, ...), None if unknown."""


# (model name, version, archive, config, instance index) -> a new, unstarted instance
InstanceFactory = Callable[[str, str, "ModelArchive", "ModelConfig", int], Instance]


def settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future, value: Any = None) -> None:
    """From an instance's own thread: set ``future``'s result to ``value`` on ``loop``, unless it
    is done by then (its waiter gave up and cancelled it); nothing once the loop has closed."""
    try:
        loop.call_soon_threadsafe(_set_once, future, value)
    except RuntimeError:  # the loop closed (shutdown): nobody waits
        pass


def _set_once(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)
