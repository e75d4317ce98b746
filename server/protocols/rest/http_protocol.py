"""uvicorn's httptools HTTP/1.1 protocol, with each response leaving in one write.

uvicorn writes a response's status line and headers when the application sends
``http.response.start`` and the body when it sends ``http.response.body``: two ``send``
system calls per response on the event loop thread, which bounds throughput for small
models (the profile in benchmarks/RESULTS.md: the two writes were about a quarter of the
loop thread's samples). Here the status line and headers wait in a buffer until the first
body message and go out with it in one write. Streaming responses still leave chunk by
chunk: only the header block is held, and only until the first body message.

It also times out requests that arrive too slowly, which uvicorn does not: a request's
head must arrive within ``request_read_timeout`` seconds of its first byte, and its body may
not stall longer than that between reads (while Osprey itself has paused reading, the
clock does not run); the client then gets 408 and the connection closes. A new connection
that sends nothing is closed after the keep-alive timeout, like an idle kept-alive one.
Without this, a client that opens connections and trickles bytes (slowloris) holds a file
descriptor each for ever.

Refusals are answered before any task exists: when a request's head is complete, the
application's ``refusal(scope, keep_alive)`` (the Router's: a route's admission check, e.g. the
model's queue is full) may return the whole answer as bytes; it is written at once, the body
that follows is discarded by the parser, and the connection goes on with its next request. A
plain POST that arrives whole in one read is asked about (``early_refusal(path)``) before the
parser's Python callbacks run at all (:meth:`OneWriteHttpToolsProtocol._early_refusal`). An
overload's excess then costs the loop little more than reading it and writing the answer.

Draining (shutdown): :meth:`OneWriteHttpToolsProtocol.begin_drain` on every open connection,
then every request gets ``Connection: close`` and its connection closes after the answer;
requests that arrive on kept-alive connections during the drain are still served (with
``Connection: close``). :meth:`OneWriteHttpToolsProtocol.idle` tells when a connection has
nothing in progress, so that the server closes it last.

An answer already under way (a chunked, streamed one) is abandoned with the ASGI message
:data:`ABORT`: the connection closes without the answer's end, so the client knows it is
incomplete.

Everything else (parsing, keep-alive, pipelining, ``Expect: 100-continue``, flow control,
the 500 for an application error) is uvicorn's own code, untouched.
"""

from __future__ import annotations

import logging
import socket
import struct
import time

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["OneWriteHttpToolsProtocol", "http_protocol", "ABORT", "connection_limit", "raise_open_files_limit",
           "begin_drain", "drain_pass"]

log = logging.getLogger("osprey.rest")

# the ASGI message (an Osprey extension) that abandons an answer already started: see _OneWriteCycle.send
ABORT = "osprey.response.abort"
_TOO_MANY_BODY = (b'{"code": 503, "type": "ServiceUnavailableException", "message": "Too many open '
                  b'connections (max_connections %d); try again later"}')
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
             b"connection: close\r\ncontent-length: %d\r\n\r\n" + _TOO_MANY_BODY)
JOIN_LIMIT = 64 * 1024  # header block + body up to this size are joined into one buffer
LINGER_S = 2.0  # after a 414/431, seconds the rest of the client's request is read and dropped
REFUSED_LINGER_S = 0.5  # the same for a connection refused for max_connections ...
REFUSED_LINGERING_MAX = 64  # ... for at most this many at once (more are closed at once)


class _HeldTransport:
    """A transport wrapper that holds writes while ``held`` and sends them joined on flush."""

    __slots__ = ("transport", "held", "parts")

    def __init__(self, transport) -> None:
        self.transport = transport
        self.held = False
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.held:
            self.parts.append(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        self.held = False
        parts = self.parts
        if not parts:
            return
        self.parts = []
        if len(parts) == 1:
            self.transport.write(parts[0])
        elif sum(map(len, parts)) <= JOIN_LIMIT:
            self.transport.write(b"".join(parts))
        else:  # a large body: writelines (with uvloop one vectored write, no copy; plain asyncio joins)
            self.transport.writelines(parts)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class _OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle; its ``send`` holds the header block until the first body message.

    Request cycles become this class in :meth:`OneWriteHttpToolsProtocol._start_asgi_task`
    (a class switch, not a wrapper object: a wrapper holding the cycle's bound ``send`` would
    make every request a reference cycle for the garbage collector).
    """

    async def send(self, message) -> None:
        transport = self.transport
        if message["type"] == ABORT:
            # an answer under way cannot be completed (a streamed answer whose request failed):
            # close the connection without ending it, so the client sees it incomplete, as
            # TorchServe does; the response counts as done (uvicorn logs no error for it).
            # "hard": a client that does not read is cut at once, what waits for it dropped
            # (a send of this cycle waiting for it to drain then returns, as for a client gone)
            self.keep_alive = False
            self.response_complete = True
            self.message_event.set()
            if message.get("hard"):  # a reset: what the socket still queues for the client goes too
                self.disconnected = True
                try:
                    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                  struct.pack("ii", 1, 0))
                except Exception:  # (no socket to ask: closed at least)
                    pass
                transport.abort()
            else:
                transport.close()
            self.on_response()
            return
        if message["type"] == "http.response.start":
            transport.held = True
            try:
                await super().send(message)
            except BaseException:
                transport.flush()
                raise
            return
        try:
            await super().send(message)
        finally:
            transport.flush()


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol whose request cycles send each response in one write, and
    which answers 408 to a request that arrives too slowly."""

    read_timeout = 60.0  # seconds; 0 or less: no read timeout (set by :func:`http_protocol`)
    max_connections = 0  # open connections on this port before new ones are refused; 0: no limit
    refused_connections = 0  # connections refused for max_connections (per listener class)
    _lingering = 0  # refused connections still open for their lingering close
    _refused_logged = -1e9
    max_header_size = 65536  # bytes of request line and headers (set by :func:`http_protocol`)
    _head_size = 0  # bytes of the head's line and headers parsed so far
    _head_raw = 0  # bytes received while the head was incomplete (after its first read)
    _head_too_large: bytes | None = None  # the answer to send instead of the parser's generic 400
    _discarding = False  # the head was too large: what the client still sends is dropped

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.max_connections and len(self.server_state.connections) > self.max_connections:
            self._over_limit(transport)
            return
        self._parser_error: str | None = None  # what the parser said about the request it refused
        self._read_timer = None
        self._head_deadline = 0.0  # while a request's head is arriving: when it must be complete
        self._in_body = False  # a request's body is arriving
        self._running = None  # the request cycle started last
        self._held = None  # the held transport of the last request cycle with a task
        self._early = getattr(self.app, "early_refusal", None)  # see _early_refusal
        self._refusing = getattr(self.app, "refusing", None)  # is anything being refused lately?
        self._admitted = False  # the request being parsed passed early_refusal's admission check
        self.last_active = time.monotonic()  # last data received or answer sent (the drain reads it)
        if self.timeout_keep_alive > 0:  # a connection that never sends a request is idle, too
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def _over_limit(self, transport) -> None:
        """More connections are open on this port than ``max_connections``: this one is answered
        503 at once and closed, before anything is read, so that the server keeps file descriptors
        for its own work (models, logs, state) and serves the connections it has."""
        self._read_timer = None
        self._head_deadline = 0.0
        self._in_body = False
        self._discarding = True  # whatever the client sends is dropped
        self.last_active = time.monotonic()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        cls = type(self)
        cls.refused_connections += 1
        transport.write(_TOO_MANY % (len(_TOO_MANY_BODY % self.max_connections), self.max_connections))
        # a short lingering close, so that a client already sending its body reads the 503 rather
        # than a reset; only for a few at a time: a flood of refused connections must not hold
        # the descriptors the limit is there to keep
        if cls._lingering < REFUSED_LINGERING_MAX and transport.can_write_eof():
            cls._lingering += 1
            transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, self._end_linger, transport)
        else:
            transport.close()
        now = time.monotonic()
        if now - cls._refused_logged >= 5.0:  # one line per 5 s at most, with the count so far
            cls._refused_logged = now
            log.warning("event=connections_refused open=%d max_connections=%d refused_total=%d",
                        len(self.server_state.connections), self.max_connections, cls.refused_connections)

    def _end_linger(self, transport) -> None:
        type(self)._lingering -= 1
        transport.close()

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()  # a client that just got its answer may send the next one soon
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:  # after a 414/431: read and dropped until the connection closes
            return
        self.last_active = time.monotonic()
        if (self._early is not None and data[:6] == b"POST /" and self._refusing() and not self.draining
                and not self.pipeline
                and not self._head_deadline and not self._in_body and (self.cycle is None or self.cycle.response_complete)):
            answer = self._early_refusal(data)
            if answer == b"":  # admitted: parsed as usual below, and not asked again (see refusal)
                self._admitted = True
                try:
                    self._feed(data)
                finally:
                    self._admitted = False
                if self.read_timeout > 0 and not self.transport.is_closing():
                    self._arm_read_timer()
                return
            if answer is not None:
                self.transport.write(answer)
                self.server_state.total_requests += 1
                if self.timeout_keep_alive > 0:  # idle again: as uvicorn's on_response_complete
                    if self.timeout_keep_alive_task is not None:
                        self.timeout_keep_alive_task.cancel()
                    self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                        self.timeout_keep_alive_handler)
                return
        if self._head_deadline:  # a head still arriving: the parser holds a header whole until it ends
            self._head_raw += len(data)
            if self._head_raw > self.max_header_size + 65536:  # the limit, and a read's worth of body
                self._too_large(line=False)
                self.send_400_response("")
                return
        self._feed(data)
        if self.read_timeout > 0 and not self.transport.is_closing():
            self._arm_read_timer()

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, keeping the text of a parser error for the answer."""
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            self._parser_error = str(exc)  # the parser's own words ("Invalid header value char")
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_deadline = time.monotonic() + self.read_timeout
        self._head_size = self._head_raw = 0

    # --- the head's size: the parser keeps every header in memory until the head is complete ----
    # uvicorn's on_url and on_header, with the count (written out: these run for every header)
    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > self.max_header_size:
            if len(self.url) < 64:  # enough of it to tell the API (/v2) the error's shape follows
                self.url += url[:64]
            self._too_large(line=True)
            raise ValueError("request line too long")  # the parser stops; uvicorn calls send_400_response
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_header_size:
            self._too_large(line=False)
            raise ValueError("request headers too large")  # as in on_url
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _too_large(self, line: bool) -> None:
        """The head is over ``max_header_size``: the answer :meth:`send_400_response` sends
        instead of the parser's 400 (414 when the request line alone is, else 431)."""
        if line:
            status, reason, kind, what = 414, b"URI Too Long", "URITooLongException", "request line longer"
        else:
            status, reason, kind, what = (431, b"Request Header Fields Too Large", "RequestHeaderFieldsTooLargeException",
                                          "request headers larger")
        # in the error shape of the API the URL names (OIP's {"error"} under /v2), as _error does
        self._head_too_large = self._error(status, reason, kind,
                                           f"{what} than {self.max_header_size} bytes (setting max_header_size)")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused, as Osprey's JSON error naming what
        the parser found (``Invalid header value char``, ...); the connection then closes."""
        answer, self._head_too_large = self._head_too_large, None
        if answer is None:
            why, self._parser_error = self._parser_error, None
            message = f"{msg.rstrip('.')}: {why}" if why else msg
            answer = self._error(400, b"Bad Request", "BadRequestException", message)
        self._cancel_read_timer()
        self.transport.write(answer)
        # a lingering close: the client may still be sending the rest of its head; closing with
        # unread data would reset the connection and lose the answer on its way, so the answer
        # is followed by FIN and what arrives is read and dropped, for at most LINGER_S
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_deadline = 0.0
        self._in_body = True
        running = self._running
        super().on_headers_complete()
        if self.draining and self.pipeline and running is not None and not running.response_started:
            running.keep_alive = True  # a request arrived behind it: the connection closes after that one

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cancel_read_timer()
        super().on_message_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        if self.draining and not self.pipeline:  # the last request known on this connection: close after it
            cycle.keep_alive = False
        self._running = cycle
        refusal = getattr(app, "refusal", None)
        if self._admitted:  # admitted by early_refusal a moment ago
            self._admitted = False
            cycle.scope["osprey.admitted"] = True
        if refusal is not None:
            data = refusal(cycle.scope, cycle.keep_alive)
            if data is not None:
                self._refuse(cycle, data)
                return
        cycle.transport = self._held = _HeldTransport(cycle.transport)
        cycle.__class__ = _OneWriteCycle
        super()._start_asgi_task(cycle, app)

    def _early_refusal(self, data: bytes) -> bytes | None:
        """The refusal of the one whole request ``data`` holds, or None.

        Under overload most requests are refused; this answers them without the parser's Python
        callbacks, a request cycle or a scope: only a plain ``POST`` of HTTP/1.1 with a
        Content-Length, arriving whole in one read (nothing before or after it), without
        Connection, Expect, Upgrade or Transfer-Encoding headers and with a path of no query or
        escapes, and only where the application refuses it (``early_refusal(path)``). Anything
        else goes through uvicorn's parser as usual. ``b""``: the application admitted it (it is
        not asked again when its head is parsed).
        """
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        line_end = data.find(b"\r\n")
        parts = data[:line_end].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        target = parts[1]
        if b"?" in target or b"%" in target:
            return None
        head = data[line_end:end + 2].lower()
        i = head.find(b"\r\ncontent-length:")
        if (i < 0 or b"\r\nconnection:" in head or b"\r\ntransfer-encoding:" in head or b"\r\nexpect:" in head
                or b"\r\nupgrade:" in head):
            return None
        try:
            length = int(head[i + 17:head.find(b"\r\n", i + 17)])
        except ValueError:
            return None
        if len(data) != end + 4 + length:
            return None
        return self._early(target.decode("latin-1"))

    def _refuse(self, cycle, data: bytes) -> None:
        """Answer ``cycle`` with ``data`` now, as the cycle would have at the end of its response."""
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()  # nothing waits on it; as uvicorn leaves it
        if self._held is not None:  # a pipelined request: the answer before it may still be held
            self._held.flush()
        self.transport.write(data)
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    # --- drain (shutdown) -------------------------------------------------------------
    draining = False  # set per connection by begin_drain

    def begin_drain(self) -> None:
        """From now on every answer on this connection says ``Connection: close`` and the connection
        closes after the last request it has received; an idle connection stays open (a request
        may be on its way) until the server closes it at the end of the drain."""
        self.draining = True
        if self.pipeline:  # appendleft: the newest pipelined request is pipeline[0]
            self.pipeline[0][0].keep_alive = False
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.response_started:
            cycle.keep_alive = False
        # a response already under way leaves without the header; the connection is then idle
        # and is closed at the end of the drain

    def idle(self) -> bool:
        """Nothing in progress: no request being received, answered or queued behind another."""
        if self._head_deadline or self._in_body or self.pipeline:
            return False
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    # --- read timeout ----------------------------------------------------------------
    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _arm_read_timer(self) -> None:
        """After data arrived: time the request still arriving, if any."""
        if self._head_deadline:  # the head must be complete by a fixed time: trickling does not help
            delay = self._head_deadline - time.monotonic()
        elif self._in_body:  # the body may not stall longer than read_timeout between reads
            delay = self.read_timeout
        else:
            self._cancel_read_timer()
            # no request begun (bare CRLFs between requests are skipped by the parser, and
            # uvicorn's data_received cancelled the keep-alive timer): the connection is idle
            if (self.timeout_keep_alive_task is None and self.timeout_keep_alive > 0 and not self.pipeline
                    and (self.cycle is None or self.cycle.response_complete)):
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)
            return
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(max(delay, 0.0), self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not (self._head_deadline or self._in_body):
            return
        if self.flow.read_paused:  # Osprey stopped reading (the application is behind), not the client
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)
            return
        if self.pipeline and not self._head_deadline:  # a queued request's body stalled: nothing to answer on
            self.transport.close()
            return
        cycle = self.cycle
        if self._head_deadline and cycle is not None and not cycle.response_complete:
            # a pipelined request stalled while the one before it is answered: finish that one, then close
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        if cycle is None or not cycle.response_started:
            what = "request headers" if self._head_deadline else "request body"
            self.transport.write(self._error(408, b"Request Timeout", "RequestTimeoutException",
                                             f"{what} not received within {self.read_timeout:g} s"))
        self.transport.close()

    def _error(self, status: int, reason: bytes, kind: str, message: str) -> bytes:
        """A whole error answer that closes the connection, in the error body of the API the
        request was for (as far as its URL was read): the Open Inference Protocol's
        ``{"error"}`` under /v2, TorchServe's ``{"code", "type", "message"}`` elsewhere."""
        url = getattr(self, "url", b"") or b""
        oip = url == b"/v2" or url.startswith((b"/v2/", b"/v2?"))
        body = orjson.dumps({"error": message} if oip else {"code": status, "type": kind, "message": message})
        return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (status, reason, len(body), body))


def begin_drain(connections) -> None:
    """Every connection answers with ``Connection: close`` from now on (uvicorn's own protocol:
    idle ones close now, busy ones after their answer)."""
    for conn in connections:
        begin = getattr(conn, "begin_drain", None)
        if begin is not None:
            begin()
        else:
            conn.shutdown()


def drain_pass(connections, now: float, linger: float) -> bool:
    """One look at draining connections: an idle one not used for ``linger`` seconds is closed;
    True while any is busy or was used just now (its client's next request may be on its way)."""
    busy = False
    for conn in connections:
        if not getattr(conn, "idle", lambda: True)():
            busy = True
        elif now - getattr(conn, "last_active", 0.0) >= linger:
            conn.shutdown()  # idle, and not used lately: closed
        else:
            busy = True
    return busy


def http_protocol(read_timeout: float = 60.0, max_header_size: int = 65536, max_connections: int = 0):
    """The protocol for uvicorn's ``http=``: Osprey's where the installed uvicorn has the hook
    it relies on (``HttpToolsProtocol._start_asgi_task``, a cycle class without slots), else
    uvicorn's own httptools protocol (two writes per response, no read timeout, no head limit,
    no connection limit). One class per listener: ``max_connections`` counts that port's."""
    if callable(getattr(HttpToolsProtocol, "_start_asgi_task", None)) and "__slots__" not in vars(RequestResponseCycle):
        return type("OspreyHttpProtocol", (OneWriteHttpToolsProtocol,),
                    {"read_timeout": float(read_timeout), "max_header_size": int(max_header_size),
                     "max_connections": max(0, int(max_connections))})
    return "httptools"


FD_RESERVE = 256  # file descriptors kept for the server's own work when the limit is derived


def connection_limit(setting: int) -> int:
    """``max_connections`` as given, or (0) derived from this process's open-files limit, leaving
    :data:`FD_RESERVE` descriptors for models, logs, state files and the other ports."""
    if setting > 0:
        return setting
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 0
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(64, soft - FD_RESERVE, soft // 2)  # (a small limit that could not be raised keeps half)


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft open-files limit to its hard limit (the JVM does so for
    TorchServe); (old, new) when raised, else None. Children inherit it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    # the hard limit, or with none some systems refuse a large value (macOS caps it per process):
    # then smaller ones
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 65536, 10240]
    for target in targets:
        if soft >= target:
            return None
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (OSError, ValueError):
            continue
    return None
