"""TorchServe's log files, in its layout (its log4j2.xml):

==================  ==============================  =======================================
file                what                            line
==================  ==============================  =======================================
access_log.log      every HTTP answer, every port   ``%d{ISO8601} - /IP:PORT "METHOD URI HTTP/1.1" STATUS MS``
                    and every gRPC call             ``... "gRPC SERVICE/METHOD HTTP/2.0" GRPC_CODE MS``
model_log.log       handler output (print, logging  ``%d{ISO8601} [%-5p] W-9000-m_1.0-stdout MODEL_LOG - msg``
                    from the handler's thread; a
                    process instance's child sends
                    them to its reader thread)
ts_log.log          the server's own log (and the   ``%d{ISO8601} [%-5p] THREAD LOGGER - msg``
                    model log lines, as TorchServe)
ts_metrics.log      metrics_mode=log, frontend      ``%d{ISO8601} - Name.Unit:value|#dims|#hostname:H,timestamp:T``
model_metrics.log   metrics_mode=log, handlers      same, with ``requestID:``
==================  ==============================  =======================================

access/model/ts logs go to ``log_location`` (or the ``LOG_LOCATION`` environment variable),
the metrics logs to ``metrics_location`` (``METRICS_LOCATION``, else ``logs``: as in
TorchServe's log4j2.xml, whatever the log location says). Each file is rotated at ``log_max_bytes`` (TorchServe: 100 MB) and
``log_backup_count`` older files are kept gzipped (``access_log.log.1.gz`` ...; TorchServe names
them by date, ``access_log.29-Nov.log.gz``, and also rotates daily: Osprey rotates by size only).

access_log.log, model_log.log and ts_log.log are not written on the caller's thread: lines are
queued and one writer thread (stdlib :class:`logging.handlers.QueueListener`) writes them through
:class:`~logging.handlers.RotatingFileHandler` objects; the event loop's access log lines are
buffered and handed over about twice a second in one piece per file.

The metrics files are written on the caller's thread (:meth:`LogFiles.write_now`, one write of
what :class:`monitoring.metrics_log.MetricsLog` gathered): a request's metric lines are in
ts_metrics.log and model_metrics.log before its answer leaves, as TorchServe's synchronous log4j2
appenders have them (scripts and TorchServe's own tests read the file right after an answer).
Rotating one of them only renames it on the caller's thread; shifting the older backups and
gzipping it is done by the writer thread, one rotation after another.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gzip
import logging
import logging.handlers
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from monitoring.metrics_log import iso8601

__all__ = ["LogFiles"]

_LEVELS = {"WARNING": "WARN ", "CRITICAL": "FATAL", "INFO": "INFO ", "DEBUG": "DEBUG", "ERROR": "ERROR"}
FILES = ("access_log", "model_log", "ts_log", "ts_metrics", "model_metrics")
DIRECT = ("ts_metrics", "model_metrics")  # written on the caller's thread (LogFiles.write_now)


def _gzip_rotator(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    os.remove(source)


class _FileOf(logging.Filter):
    """Lets through the records meant for one file (record.osprey_file)."""

    def __init__(self, name: str):
        super().__init__()
        self.file = name

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "osprey_file", None) == self.file


def _line(record_time: float, level: str, thread: str, logger: str, message: str) -> str:
    return f"{iso8601(record_time)} [{_LEVELS.get(level, level[:5].ljust(5))}] {thread} {logger} - {message}\n"


class _DirectFile(logging.handlers.RotatingFileHandler):
    """A file written on the caller's thread (the handler's lock orders the callers). A rollover
    renames the full file aside and reopens at once; ``later(job)`` runs the slow part (shift the
    backups, gzip the renamed file into ``.1.gz``) on the writer thread, in rollover order."""

    def __init__(self, path: Path, later: Any, **kw: Any):
        self._size = 0
        super().__init__(path, **kw)
        self._later = later
        self._rotations = 0

    def _open(self):
        stream = super()._open()
        self._size = os.fstat(stream.fileno()).st_size
        return stream

    def write(self, text: str) -> None:
        """Append ``text`` and flush it, rolling over first when it would pass maxBytes. The size
        is counted here: the stdlib's shouldRollover seeks to the end and stats the file twice per
        record, which cost more than the write itself; no LogRecord or formatting either."""
        size = len(text.encode("utf-8"))
        with self.lock:
            try:
                if self.maxBytes > 0 and self._size > 0 and self._size + size >= self.maxBytes:
                    self.doRollover()
                if self.stream is None:
                    self.stream = self._open()
                self.stream.write(text)
                self.stream.flush()
                self._size += size
            except Exception:
                self.handleError(logging.LogRecord("osprey.files", logging.ERROR, "", 0, text[:200], None, None))

    def doRollover(self) -> None:
        if self.backupCount <= 0:
            return super().doRollover()
        if self.stream:
            self.stream.close()
            self.stream = None
        self._rotations += 1
        aside = f"{self.baseFilename}.rotating-{os.getpid()}-{self._rotations}"
        if os.path.exists(self.baseFilename):
            os.rename(self.baseFilename, aside)
            self._later(functools.partial(self._shift_and_gzip, aside))
        self.stream = self._open()

    def _shift_and_gzip(self, aside: str) -> None:  # on the writer thread
        for i in range(self.backupCount - 1, 0, -1):
            src = self.rotation_filename(f"{self.baseFilename}.{i}")
            if os.path.exists(src):
                os.replace(src, self.rotation_filename(f"{self.baseFilename}.{i + 1}"))
        _gzip_rotator(aside, self.rotation_filename(self.baseFilename + ".1"))


class _Jobs(logging.Handler):
    """On the writer thread: runs the callables queued as records (``osprey_job``)."""

    def emit(self, record: logging.LogRecord) -> None:
        job = getattr(record, "osprey_job", None)
        if job is not None:
            try:
                job()
            except Exception:
                self.handleError(record)


class _Route(logging.Handler):
    """On the root logger: formats each record TorchServe's way in the emitting thread and
    queues it for ts_log.log, and for model_log.log too when it comes from a handler (a
    non-Osprey logger in a model instance's thread)."""

    def __init__(self, files: "LogFiles"):
        super().__init__()
        self.files = files

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            worker = getattr(threading.current_thread(), "osprey_worker", None)
            if worker is not None and not record.name.startswith("osprey"):
                line = _line(record.created, record.levelname, f"{worker}-stdout", "MODEL_LOG", message)
                self.files.put("model_log", line)
                self.files.put("ts_log", line)
            else:
                self.files.put("ts_log", _line(record.created, record.levelname, record.threadName, record.name,
                                               message))
        except Exception:
            self.handleError(record)


class _Stream:
    """sys.stdout / sys.stderr: what a model instance's thread prints goes to model_log.log
    (TorchServe's ``W-...-stdout MODEL_LOG`` lines); other threads' output where it went."""

    def __init__(self, files: "LogFiles", inner: Any, suffix: str, level: str):
        self.files, self.inner, self.suffix, self.level = files, inner, suffix, level
        self._partial = threading.local()

    def write(self, text: str) -> int:
        worker = getattr(threading.current_thread(), "osprey_worker", None)
        if worker is None:
            return self.inner.write(text)
        buf = getattr(self._partial, "text", "") + text
        *lines, rest = buf.split("\n")
        self._partial.text = rest
        now = time.time()
        for line in lines:
            out = _line(now, self.level, f"{worker}-{self.suffix}", "MODEL_LOG", line)
            self.files.put("model_log", out)
            self.files.put("ts_log", out)
            if self.files.console:  # model_log_console: TorchServe's console has these lines too
                self.inner.write(out)
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class LogFiles:
    def __init__(self, log_location: str, metrics_location: str, *, max_bytes: int, backups: int,
                 server_logs: bool = True, metrics_logs: bool = False, console: bool = False):
        self.console = console  # handler output also to the real stdout/stderr (model_log_console)
        self.paths: dict[str, Path] = {}
        if server_logs:
            for name in ("access_log", "model_log", "ts_log"):
                self.paths[name] = Path(log_location) / f"{name}.log"
        if metrics_logs:
            for name in DIRECT:
                self.paths[name] = Path(metrics_location) / f"{name}.log"
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        handlers: list[logging.Handler] = []
        self._direct: dict[str, _DirectFile] = {}
        for name, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if name in DIRECT:
                h = _DirectFile(path, self._later, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
                self._direct[name] = h
            else:
                h = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                         encoding="utf-8")
                h.addFilter(_FileOf(name))
                handlers.append(h)
            h.namer = lambda default: default + ".gz"
            h.rotator = _gzip_rotator
            h.terminator = ""  # lines carry their own newlines
            h.setFormatter(logging.Formatter("%(message)s"))
        jobs = _Jobs()
        jobs.addFilter(_FileOf("_jobs"))
        self._handlers = [*handlers, *self._direct.values()]
        self._listener = logging.handlers.QueueListener(self._queue, *handlers, jobs, respect_handler_level=False)
        self._listener.start()
        self._buffers: dict[str, collections.deque] = {n: collections.deque() for n in self.paths}
        self._timer: asyncio.TimerHandle | None = None
        self._route: _Route | None = None
        self._streams: tuple | None = None

    @classmethod
    def from_settings(cls, s: Any) -> "LogFiles | None":
        server_logs = bool(s.log_location)
        metrics_logs = s.metrics_mode == "log"
        if not server_logs and not metrics_logs:
            return None
        return cls(s.log_location, s.metrics_location or "logs", max_bytes=s.log_max_bytes,
                   backups=s.log_backup_count, server_logs=server_logs, metrics_logs=metrics_logs,
                   console=s.model_log_console)

    # --- writing --------------------------------------------------------------------------
    def put(self, file: str, text: str) -> None:
        """Queue ``text`` (whole lines) for ``file`` now (any thread)."""
        if file in self.paths and text:
            record = logging.LogRecord("osprey.files", logging.INFO, "", 0, text, None, None)
            record.osprey_file = file
            self._queue.put(record)

    def write_now(self, file: str, text: str) -> None:
        """Write ``text`` (whole lines) to a metrics file before returning (any thread; see the
        module docstring); other files are queued as by :meth:`put`."""
        h = self._direct.get(file)
        if h is None:
            return self.put(file, text)
        if text:
            h.write(text)

    def _later(self, job: Any) -> None:
        """Run ``job`` on the writer thread (after what is queued before it)."""
        record = logging.LogRecord("osprey.files", logging.INFO, "", 0, "", None, None)
        record.osprey_file, record.osprey_job = "_jobs", job
        self._queue.put(record)

    def buffer(self, file: str, line: str) -> None:
        """Keep ``line`` for ``file`` until the next flush (the event loop's lines)."""
        buf = self._buffers.get(file)
        if buf is not None:
            buf.append(line)

    def flush(self) -> None:
        for file, buf in self._buffers.items():
            if buf:
                parts = []
                try:
                    while True:
                        parts.append(buf.popleft())
                except IndexError:
                    pass
                self.put(file, "".join(parts))

    # --- wiring ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, flush_every: float = 0.5) -> None:
        """Route the server's logging and handler output into the files; flush buffers on a timer."""
        if "ts_log" in self.paths:
            self._route = _Route(self)
            logging.getLogger().addHandler(self._route)
            self._streams = (sys.stdout, sys.stderr)
            sys.stdout = _Stream(self, sys.stdout, "stdout", "INFO")
            sys.stderr = _Stream(self, sys.stderr, "stderr", "WARNING")

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(flush_every, tick)
        self._timer = loop.call_later(flush_every, tick)

    def access(self, scope: dict, status: int, started: float) -> None:
        """Router hook: one HTTP answer (TorchServe's access log line)."""
        buf = self._buffers.get("access_log")
        if buf is None:
            return
        client = scope.get("client")
        remote = f"/{client[0]}:{client[1]}" if client else "/0.0.0.0"
        uri = scope.get("raw_path") or scope["path"].encode()
        qs = scope.get("query_string")
        if qs:
            uri += b"?" + qs
        now = time.time()
        buf.append(f'{iso8601(now)} - {remote} "{scope["method"]} {uri.decode("latin-1")} '
                   f'HTTP/{scope.get("http_version", "1.1")}" {status} {int((time.monotonic() - started) * 1000)}\n')

    def grpc_access(self, peer: str, method: str, code: int, started: float) -> None:
        """gRPC hook (server/protocols/grpc/access.py): one ended call, TorchServe's gRPC line."""
        buf = self._buffers.get("access_log")
        if buf is not None:
            buf.append(f'{iso8601(time.time())} - {peer} "gRPC {method} HTTP/2.0" {code} '
                       f'{int((time.monotonic() - started) * 1000)}\n')

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._route is not None:
            logging.getLogger().removeHandler(self._route)
            self._route = None
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        self._listener.stop()
        for h in self._handlers:
            h.close()
