"""What the server says when a worker (model instance) is lost and replaced: its log lines and
the answer to a request that ran past the model's responseTimeout. The ``worker_lifecycle``
setting picks one of two wordings; the registry (supervision) and the batcher (running
deadlines) call these hooks and never word anything themselves.

- ``osprey`` (``osprey serve``'s default): the structured ``event=`` lines (``instance_hung``,
  ``instance_restarting``, ``instance_restarted``; see server/core/events.py) and 504
  ``Request timed out while running (deadline exceeded)``.
- ``torchserve`` (``osprey torchserve``'s default): TorchServe 0.12's frontend lines, which
  operators grep and alert on (its WorkerThread.java)::

      Number or consecutive unsuccessful inference 1        (ERROR, a response timeout)
      Backend worker error: Backend worker did not respond in given time   (ERROR)
      9000 Worker disconnected. WORKER_MODEL_LOADED        (a hung or crashed worker)
      Auto recovery start timestamp: 1796004400964          (the first loss; then "Auto recovery failed again")
      Retry worker: 9000 in 1 seconds.
      Auto recovery succeeded, reset recoveryStartTS       (the replacement loaded)

  and TorchServe's answer to a request past responseTimeout: 500 ``Worker died.``
  (InternalServerException). The count is per model version and resets when an instance
  finishes a batch (TorchServe's resetFailedInfReqs after a successful prediction).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from server.core.errors import ErrorKind, OspreyError
from server.core.events import event

__all__ = ["WorkerLines", "OspreyWorkerLines", "TorchServeWorkerLines", "worker_lines", "STYLES"]

STYLES = ("osprey", "torchserve")


class WorkerLines:
    """The hooks; ``log`` is the registry's logger."""

    def __init__(self, log: logging.Logger):
        self.log = log

    def running_timeout(self) -> OspreyError:
        """The error a request still running at its deadline (responseTimeout) is answered."""
        raise NotImplementedError

    def hung(self, mv: Any, inst: Any, in_a_row: int, reason: str, action: str, **fields: Any) -> None:
        """``inst`` ran past responseTimeout (plus hang_grace): ``action`` is killed or abandoned;
        ``in_a_row``: handoffs of this version reported hung since one last finished."""

    def lost(self, mv: Any, inst: Any, reason: str) -> None:
        """``inst`` is out of service (hung or crashed) and will be replaced."""

    def restarting(self, mv: Any, index: int, delay: float) -> None:
        """Instance ``index`` is started again in ``delay`` seconds."""

    def restarted(self, mv: Any, index: int) -> None:
        """Its replacement loaded and serves."""

    def restart_failed(self, mv: Any, index: int, message: str) -> None:
        """Its replacement failed to load."""


class OspreyWorkerLines(WorkerLines):
    def running_timeout(self) -> OspreyError:
        return OspreyError(ErrorKind.DEADLINE, "Request timed out while running (deadline exceeded)")

    def hung(self, mv: Any, inst: Any, in_a_row: int, reason: str, action: str, **fields: Any) -> None:
        event(self.log, "instance_hung", logging.WARNING, model=mv.name, version=mv.version, index=inst.index,
              reason=reason, action=action, **fields)

    def restarting(self, mv: Any, index: int, delay: float) -> None:
        event(self.log, "instance_restarting", model=mv.name, version=mv.version, index=index, delay_s=round(delay, 3))

    def restarted(self, mv: Any, index: int) -> None:
        event(self.log, "instance_restarted", model=mv.name, version=mv.version, index=index)

    def restart_failed(self, mv: Any, index: int, message: str) -> None:
        self.log.warning("model %s version %s: restarting instance %d failed: %s", mv.name, mv.version, index, message)


class TorchServeWorkerLines(WorkerLines):
    def __init__(self, log: logging.Logger):
        super().__init__(log)
        # (model, version, index) -> [worker id, recovery start in ms or 0] (TorchServe's recoveryStartTS)
        self._workers: dict[tuple[str, str, int], list] = {}

    def running_timeout(self) -> OspreyError:
        return OspreyError(ErrorKind.INTERNAL, "Worker died.")

    def hung(self, mv: Any, inst: Any, in_a_row: int, reason: str, action: str, **fields: Any) -> None:
        self.log.error("Number or consecutive unsuccessful inference %d", in_a_row)
        self.log.error("Backend worker error: Backend worker did not respond in given time (%s)", reason)

    def lost(self, mv: Any, inst: Any, reason: str) -> None:
        worker = self._workers.setdefault((mv.name, mv.version, inst.index), [inst.id, 0])
        worker[0] = inst.id
        self.log.info("%s Worker disconnected. WORKER_MODEL_LOADED", inst.id)
        self._stopped(worker)

    def _stopped(self, worker: list) -> None:
        if worker[1] == 0:
            worker[1] = int(time.time() * 1000)
            self.log.info("Auto recovery start timestamp: %d", worker[1])
        else:
            self.log.warning("Auto recovery failed again")

    def restarting(self, mv: Any, index: int, delay: float) -> None:
        worker = self._workers.get((mv.name, mv.version, index))
        self.log.info("Retry worker: %s in %g seconds.", worker[0] if worker else index, delay)

    def restarted(self, mv: Any, index: int) -> None:
        worker = self._workers.pop((mv.name, mv.version, index), None)
        if worker is not None and worker[1]:
            self.log.info("Auto recovery succeeded, reset recoveryStartTS")

    def restart_failed(self, mv: Any, index: int, message: str) -> None:
        self.log.error("Backend worker error: %s", message)
        worker = self._workers.setdefault((mv.name, mv.version, index), [index, 0])
        self._stopped(worker)


def worker_lines(style: str, log: logging.Logger) -> WorkerLines:
    if style == "torchserve":
        return TorchServeWorkerLines(log)
    if style == "osprey":
        return OspreyWorkerLines(log)
    raise ValueError(f"setting worker_lifecycle: {style!r} must be one of {', '.join(STYLES)}")
