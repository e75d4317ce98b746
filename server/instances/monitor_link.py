"""A process instance's own connection to the monitor process (``monitor_isolation=process``).

The child computes its batches' observations (``server.instances.capture``) and, for a model
with retraining, takes its answered requests' inputs; with a monitor in its own process it
sends both there itself (``monitoring.process``), so they never pass through the server's
front end. Posting is an O(1) append; a thread of the child sends, so a slow
or dead monitor never delays an answer. Unreachable monitor: what was posted is dropped and
counted, the count travels with the next observations that get through, and the link tries to
connect again at most once per :data:`RETRY_S`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from multiprocessing.connection import Client
from typing import Any

from server.core.capture import VersionRef
from server.core.osthread import name_os_thread

__all__ = ["MonitorLink", "RETRY_S"]

log = logging.getLogger("osprey.instances")

RETRY_S = 1.0
MAX_QUEUED = 256  # messages waiting to be sent before new ones are dropped
HOLD_BATCH = 256  # held inputs that make a message due (else they go with the next observations) ...
HOLD_DELAY_S = 0.5  # ... or once the oldest waited this long (as capture's MAX_DELAY_S)


class MonitorLink:
    def __init__(self, address: str, authkey: bytes, ref: VersionRef):
        self.address, self.authkey, self.ref = address, authkey, ref
        self.lost = 0  # rows dropped since the last message that got through
        self._queue: deque = deque()
        self._held: list = []  # held inputs not yet posted, and when the oldest came
        self._held_since = 0.0
        self._held_lock = threading.Lock()
        self._wake = threading.Event()
        self._conn = None
        self._retry_at = 0.0
        self._warned = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="osprey-mon-link", daemon=True)
        self._thread.start()

    def observations(self, observations: list) -> None:
        self._post(("observe", list(observations)), sum(len(o) for o in observations))
        self._post_held()  # the inputs held meanwhile go with them

    def mark(self, token: str) -> None:
        """After everything posted so far (the inputs held meanwhile too): ``token``, which the
        monitor process notes when it reads it. A feedback barrier (``ProcessInstance.flush_capture``)
        waits for it there: what this child captured before is then in the monitor's queue."""
        self._post_held()
        self._post(("mark", token), 0)

    def hold(self, items: list) -> None:
        """Inputs held for labels: gathered, and posted with the next observations, when
        HOLD_BATCH are waiting, or once the oldest waited HOLD_DELAY_S (few messages, not one
        per job)."""
        with self._held_lock:
            if not self._held:
                self._held_since = time.monotonic()
            self._held.extend(items)
            full = len(self._held) >= HOLD_BATCH
        if full:
            self._post_held()

    def _post_held(self) -> None:
        with self._held_lock:
            held, self._held = self._held, []
        if held:
            self._post(("hold", self.ref.name, self.ref.version, held, time.time()), len(held))

    def _held_due(self) -> float | None:
        """Seconds until the held inputs are due by age (None: none held)."""
        with self._held_lock:
            return max(0.0, self._held_since + HOLD_DELAY_S - time.monotonic()) if self._held else None

    def _post(self, msg: tuple, rows: int) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.lost += rows if msg[0] == "observe" else 0
            return
        self._queue.append((msg, rows))
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (waiting up to ``timeout``), then disconnect."""
        self._post_held()
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def _connect(self):
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if now < self._retry_at:
            return None
        try:
            conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
            conn.send(("version", self.ref))
        except Exception as exc:
            self._retry_at = now + RETRY_S
            if not self._warned:
                self._warned = True
                log.warning("model %s version %s: the monitor process is unreachable (%s); observations are "
                            "dropped until it is back (logged once)", self.ref.name, self.ref.version, exc)
            return None
        self._conn, self._warned = conn, False
        return conn

    def _run(self) -> None:
        name_os_thread("osprey-mon-link")
        while True:
            due = self._held_due()
            self._wake.wait(RETRY_S if due is None else min(RETRY_S, due))
            self._wake.clear()
            if self._held_due() == 0.0:
                self._post_held()
            tries = 0
            while self._queue:
                msg, rows = self._queue[0]
                conn = self._connect()
                if conn is None or tries >= 2:
                    self._queue.popleft()
                    tries = 0
                    if msg[0] == "observe":
                        self.lost += rows
                    continue
                if msg[0] == "observe" and self.lost:
                    msg = (*msg, self.lost)
                try:
                    conn.send(msg)
                except Exception:  # the monitor process went away: connect again at once (a new
                    self._drop_conn(retry_at=0.0)  # one may be listening), else after RETRY_S
                    tries += 1
                    continue
                self._queue.popleft()
                tries = 0
                if msg[0] == "observe":
                    self.lost = 0
            if self._closed:
                self._drop_conn()
                return

    def _drop_conn(self, retry_at: float | None = None) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        self._conn = None
        self._retry_at = time.monotonic() + RETRY_S if retry_at is None else retry_at


def open_link(spec: dict) -> MonitorLink | None:
    """The link a child's spec asks for (``monitor_link``: address and key), or None."""
    link = spec.get("monitor_link")
    if not link or not spec.get("monitor"):
        return None
    return MonitorLink(link[0], link[1], VersionRef(spec["name"], spec["version"], spec["config"], spec["model_dir"]))
