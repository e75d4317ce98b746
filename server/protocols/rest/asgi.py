"""A small ASGI toolkit: routing, body reading with a size cap, auth, errors as JSON.

Written for the hot path: a static-path dict and a short list of compiled patterns, no
middleware stack, headers decoded once. Each route names its error style, so TorchServe
routes answer ``{"code", "type", "message"}`` and Open Inference Protocol routes
``{"error": ...}``. A request whose client went away while it was queued ends without
an answer (there is no one to send it to) and without an error in the log.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import orjson

from server.core.errors import METHOD_NOT_ALLOWED_TEXT, NOT_FOUND_TEXT, ErrorKind, OspreyError
from server.core.types import next_request_id
from server.protocols.rest.encoding import decoded

__all__ = ["Request", "Response", "Sent", "Router", "json_response", "torchserve_error", "oip_error"]

log = logging.getLogger("osprey.rest")


def _too_large(limit: int) -> OspreyError:
    return OspreyError(ErrorKind.TOO_LARGE, f"Request body is larger than the {limit} bytes allowed (max_request_size)")


class Request:
    __slots__ = ("scope", "method", "path", "headers", "body", "params", "request_id",
                 "_query", "_receive", "send", "cors")

    def __init__(self, scope: dict, receive: Callable, params: dict[str, str], send: Callable | None = None):
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.body = b""
        self.params = params
        self.request_id = next_request_id()
        self._query: dict[str, str] | None = None
        self._receive = receive
        # the ASGI send: a route that answers in parts (server/protocols/rest/chunked.py) writes
        # its answer itself and returns a Sent
        self.send = send
        self.cors: list[tuple[bytes, bytes]] | None = None  # CORS headers for the answer (Router.cors)

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            qs = self.scope.get("query_string", b"")
            self._query = {k: v[-1] for k, v in parse_qs(qs.decode("latin-1"), keep_blank_values=True).items()} if qs else {}
        return self._query

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def connection(self) -> Any:
        """An object whose ``disconnected`` turns True when the client goes away, or None.

        uvicorn's request cycle (the owner of ``receive``) is such an object; reading an
        attribute is far cheaper than a task waiting on ``receive()`` for every request.
        """
        cycle = getattr(self._receive, "__self__", None)
        return cycle if hasattr(cycle, "disconnected") else None


class Response:
    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.body, self.status, self.content_type, self.headers = body, status, content_type, headers


class Sent(Response):
    """A route's answer that the route has already written itself (a chunked answer): the router
    sends nothing more; ``status`` is what was sent (access log, request counters)."""

    __slots__ = ()


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_INDENT_2 if isinstance(obj, (dict, list)) else 0), status,
                    "application/json", headers)


def torchserve_error(err: OspreyError) -> Response:
    return Response(orjson.dumps({"code": err.status, "type": err.type_name, "message": err.message}),
                    err.status, "application/json", _retry_after(err))


def oip_error(err: OspreyError) -> Response:
    return Response(orjson.dumps({"error": err.message}), err.status, "application/json", _retry_after(err))


def _retry_after(err: OspreyError) -> dict[str, str] | None:
    return {"retry-after": str(max(1, int(err.retry_after)))} if err.retry_after else None


Handler = Callable[[Request], Awaitable[Response]]
ErrorStyle = Callable[[OspreyError], Response]


# A route's admission check: called with the path parameters once the route is matched, before
# the body is read; raises OspreyError to refuse (see DataPlane.admit).
Admit = Callable[[dict[str, str]], Any]


class Route:
    __slots__ = ("methods", "handler", "errors", "auth", "max_body", "admit")

    def __init__(self, methods: tuple[str, ...], handler: Handler, errors: ErrorStyle, auth: bool, max_body: int | None,
                 admit: Admit | None = None):
        self.methods, self.handler, self.errors, self.auth, self.max_body = methods, handler, errors, auth, max_body
        self.admit = admit


def _compile(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)(:path)?\}", pattern):
        out += re.escape(pattern[pos:m.start()])
        out += f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]) + "$")


class Router:
    """An ASGI app: routes, auth, body limit, request ids and error bodies."""

    def __init__(self, *, max_body: int, token: str | None = None, auth_status: int = 401,
                 errors: ErrorStyle = torchserve_error):
        self.max_body = max_body
        self.token = token
        self.token_expires: float | None = None  # wall-clock time the token stops being accepted (auth.Keys)
        self.auth_status = auth_status
        # ``/models/m/`` matches as ``/models/m`` (TorchServe splits the path and drops empty tails)
        self.ignore_trailing_slash = False
        self.default_errors = errors
        self._static: dict[str, list[Route]] = {}
        self._patterns: list[tuple[re.Pattern, Route]] = []
        self.fallback_errors: list[tuple[str, ErrorStyle]] = []  # (path prefix, style) for 404/405
        self._refusals: dict[tuple, tuple[bytes, bytes]] = {}  # pre-encoded refusals (see refusal)
        self._refused_status = 503  # the status of the refusal _admit made last
        # admission checks run only while this says requests are being refused somewhere (set by
        # the routes that admit: DataPlane.refusing); otherwise a full queue is found at submit
        self.refusing: Callable[[], bool] = lambda: True
        # TorchServe's cors_allowed_origin / _methods / _headers: (origins, methods, headers), or None
        self.cors: tuple[tuple[str, ...], str, str] | None = None
        # (pattern, methods, Doc or None, route) in the order added: the API description
        # (server/protocols/rest/openapi.py) is built from it; matching never reads it
        self.described: list[tuple[str, tuple[str, ...], Any, Route]] = []
        # called after every answer, refusals included: (scope, status, time.monotonic() at
        # arrival); TorchServe's Requests2XX/4XX/5XX counters and its access log (server/serve.py)
        self.on_response: Callable[[dict, int, float], None] | None = None

    def add(self, methods: str | tuple[str, ...], pattern: str, handler: Handler, *,
            errors: ErrorStyle | None = None, auth: bool = True, max_body: int | None = None,
            admit: Admit | None = None, doc: Any = None) -> None:
        """Serve ``pattern`` (``{name}`` matches one segment, ``{name:path}`` the rest) with
        ``handler``; ``doc`` (an openapi.Doc) describes the route in the port's API description."""
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        route = Route(methods, handler, errors or self.default_errors, auth, max_body, admit)
        self.described.append((pattern, methods, doc, route))
        if "{" in pattern:
            self._patterns.append((_compile(pattern), route))
        else:
            self._static.setdefault(pattern, []).append(route)

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        found = False
        if self.ignore_trailing_slash and len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/") or "/"
        for route in self._static.get(path, ()):
            found = True
            if method in route.methods:
                return route, {}, True
        for regex, route in self._patterns:
            m = regex.match(path)
            if m:
                found = True
                if method in route.methods:
                    return route, m.groupdict(), True
        return None, {}, found

    # --- refusal before the request is read -----------------------------------------
    def refusal(self, scope: dict, keep_alive: bool) -> bytes | None:
        """The whole HTTP answer refusing this request, or None to serve it as usual.

        Called by the HTTP protocol (http_protocol.py) when a request's head is complete, before
        a task is made for it or its body is read: a route with an admission check that refuses
        (queue full: 503 with Retry-After; no instance; unknown model) is answered from bytes
        encoded once per model and error, plus this request's id. A request that needs its token
        checked and fails the check is left to the usual path (401). The matched route is kept
        in the scope so that :meth:`__call__` does not match it again. The admission check runs
        only while requests are being refused (``refusing``), as in :meth:`__call__`: at full
        speed it cost every request a registry lookup and the batcher's check for nothing.
        """
        method = scope["method"]
        if method == "HEAD":
            return None
        route, params, _ = self._match(method, scope["path"])
        scope["osprey.route"] = (route, params)
        if route is None or route.admit is None or scope.get("osprey.admitted") or not self.refusing():
            return None  # nothing refused lately: the batcher's submit finds a full queue (and opens the window)
        if route.auth and self.token is not None and not self._token_ok(scope["headers"]):
            return None
        answer = self._admit(route, params, keep_alive)
        if answer is not None:
            scope["osprey.route"] = None
            if self.cors is not None:  # an allowed Origin's refusal carries CORS, as every answer does
                answer = self._with_cors(answer, scope["headers"])
            if self.on_response is not None:
                self.on_response(scope, self._refused_status, time.monotonic())
        return answer

    def _with_cors(self, answer: bytes, raw_headers) -> bytes:
        """A pre-encoded refusal with Access-Control-Allow-Origin (and Vary) added for an allowed
        Origin (:meth:`_cors`'s rule); as it was for any other request."""
        for k, v in raw_headers:
            if k.lower() == b"origin":
                cors = self._allow_origin(v.decode("latin-1"))
                if cors:
                    head, sep, body = answer.partition(b"\r\n\r\n")
                    return head + b"".join(b"\r\n" + name + b": " + value for name, value in cors) + sep + body
                break
        return answer

    def _allow_origin(self, origin: str | None) -> list[tuple[bytes, bytes]] | None:
        """The CORS headers every answer to ``origin`` carries (Allow-Origin, and Vary unless any
        origin is allowed), or None for an Origin not allowed."""
        origins = self.cors[0]
        if origin is None or not ("*" in origins or origin in origins):
            return None
        if "*" in origins:
            return [(b"access-control-allow-origin", b"*")]
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    def early_refusal(self, path: str) -> bytes | None:
        """:meth:`refusal` for a plain ``POST`` on a kept-alive connection, from the path alone
        (http_protocol.py answers it before parsing headers into a scope); ``b""`` when admitted
        (:meth:`refusal` then finds ``osprey.admitted`` in the scope and does not ask again);
        None where a token must be checked or the route has no admission check."""
        route, params, _ = self._match("POST", path)
        if route is None or route.admit is None or (route.auth and self.token is not None) or self.cors is not None:
            return None  # (with CORS, the answer depends on the Origin header: refusal() reads it)
        answer = self._admit(route, params, True)
        if answer is None:
            return b""
        if self.on_response is not None:
            self.on_response({"type": "http", "method": "POST", "path": path}, self._refused_status, time.monotonic())
        return answer

    def _admit(self, route: Route, params: dict[str, str], keep_alive: bool) -> bytes | None:
        """Run the route's admission check: None if admitted, else the whole refusal (bytes encoded
        once per route style, error and keep-alive, plus a fresh request id)."""
        try:
            route.admit(params)
        except OspreyError as err:
            key = (route.errors, err.kind, err.status, err.message, keep_alive)
            parts = self._refusals.get(key)
            if parts is None:
                if len(self._refusals) > 4096:  # messages name models: bounded by models x styles, but be safe
                    self._refusals.clear()
                parts = self._refusals[key] = self._encode_refusal(route.errors(err), keep_alive)
            self._refused_status = err.status
            return parts[0] + next_request_id().encode() + parts[1]
        return None

    @staticmethod
    def _encode_refusal(response: Response, keep_alive: bool) -> tuple[bytes, bytes]:
        try:
            phrase = http.HTTPStatus(response.status).phrase
        except ValueError:
            phrase = ""
        head = [f"HTTP/1.1 {response.status} {phrase}\r\n".encode("latin-1"),
                b"content-type: " + response.content_type.encode("latin-1") + b"\r\n",
                b"content-length: %d\r\n" % len(response.body)]
        for k, v in (response.headers or {}).items():
            head.append(k.encode("latin-1") + b": " + str(v).encode("latin-1") + b"\r\n")
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"x-request-id: ")
        return b"".join(head), b"\r\n\r\n" + response.body

    def _token_ok(self, raw_headers) -> bool:
        for k, v in raw_headers:
            if k.lower() == b"authorization":
                auth = v.decode("latin-1")
                return auth[:7].lower() == "bearer " and self._current(auth[7:].strip())
        return False

    def _current(self, token: str) -> bool:
        """``token`` is this router's key and it has not expired."""
        return token == self.token and (self.token_expires is None or time.time() < self.token_expires)

    def _style_for(self, path: str) -> ErrorStyle:
        for prefix, style in self.fallback_errors:
            if path.startswith(prefix):
                return style
        return self.default_errors

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            return
        started = time.monotonic()
        method = scope["method"]
        path = scope["path"]
        matched = scope.get("osprey.route")
        if matched is not None:  # matched already by refusal() (and admitted)
            (route, params), path_known = matched, True
            if route is None:
                route, params, path_known = self._match("GET" if method == "HEAD" else method, path)
        else:
            route, params, path_known = self._match("GET" if method == "HEAD" else method, path)
        req = Request(scope, receive, params, send)
        if self.cors is not None and await self._cors(req, send, method, started, scope):
            return  # a preflight, answered
        try:
            if route is None:
                if self.token is not None:  # as TorchServe, the token before the route: without a key
                    self._check_token(req)  # nobody learns which paths and methods exist
                if path_known:
                    raise OspreyError(ErrorKind.METHOD_NOT_ALLOWED, METHOD_NOT_ALLOWED_TEXT)  # TorchServe's text
                raise OspreyError(ErrorKind.NOT_FOUND, NOT_FOUND_TEXT, type_name="ResourceNotFoundException")
            if route.auth and self.token is not None:
                self._check_token(req)
            if route.admit is not None and matched is None and self.refusing():  # refuse before the body
                route.admit(params)
            if method in ("POST", "PUT", "PATCH", "DELETE"):
                req.body = await self._read_body(req, receive, route.max_body or self.max_body)
            response = await route.handler(req)
        except asyncio.CancelledError:
            conn = req.connection()
            gone = conn is not None and conn.disconnected
            # Python 3.11+ tells whether this task is being cancelled; on 3.10 a cancellation
            # whose client is also gone is taken for a dropped request and ends quietly (at
            # shutdown that only skips an answer nobody could receive)
            cancelling = getattr(asyncio.current_task(), "cancelling", None)
            if cancelling() if cancelling is not None else not gone:
                raise  # this task itself is being cancelled (shutdown)
            # What the handler awaited was cancelled, not this task: the batcher drops a
            # request whose client went away (the data plane counted it as cancelled).
            if gone:
                return  # nobody to answer
            response = (route.errors if route is not None else self.default_errors)(
                OspreyError(ErrorKind.CANCELLED, "the request was cancelled before it ran"))
        except OspreyError as err:
            style = route.errors if route is not None else self._style_for(path)
            response = style(err)
        except Exception:
            log.exception("unhandled error for %s %s", method, path)
            err = OspreyError(ErrorKind.INTERNAL, "Internal server error")
            response = (route.errors if route is not None else self.default_errors)(err)
        if not isinstance(response, Sent):
            await self._send(send, req, response, method == "HEAD")
        if self.on_response is not None:
            self.on_response(scope, response.status, started)

    async def _cors(self, req: Request, send: Callable, method: str, started: float, scope: dict) -> bool:
        """CORS as TorchServe's Netty CorsHandler does it: a request from an allowed Origin gets
        Access-Control-Allow-Origin on its answer; a preflight (OPTIONS with
        Access-Control-Request-Method) is answered here, 200, before auth and routing. True
        when the request was a preflight and is answered."""
        req.cors = self._allow_origin(req.headers.get("origin"))
        if req.cors is None:
            return False
        _, methods, headers = self.cors
        if method != "OPTIONS" or "access-control-request-method" not in req.headers:
            return False
        if methods:
            req.cors.append((b"access-control-allow-methods", methods.encode("latin-1")))
        if headers:
            req.cors.append((b"access-control-allow-headers", headers.encode("latin-1")))
        await self._send(send, req, Response(b"", 200, "text/plain"), False)
        if self.on_response is not None:
            self.on_response(scope, 200, started)
        return True

    def _check_token(self, req: Request) -> None:
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() != "bearer " or not self._current(auth[7:].strip()):
            raise OspreyError(ErrorKind.UNAUTHORIZED,
                              "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
                              status=self.auth_status)

    async def _read_body(self, req: Request, receive: Callable, limit: int) -> bytes:
        body = await self._read_raw(req, receive, limit)
        coding = req.headers.get("content-encoding")
        if coding is None or not body or not req.path.startswith("/v2/"):  # (TorchServe's APIs: as it came)
            return body
        # in a thread whatever its size: a few kB can inflate to the whole limit
        return await asyncio.to_thread(decoded, body, coding, limit)

    async def _read_raw(self, req: Request, receive: Callable, limit: int) -> bytes:
        length = req.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    raise OspreyError(ErrorKind.TOO_LARGE, f"Request body of {length} bytes is larger than the {limit} bytes allowed (max_request_size)")
            except ValueError:
                raise OspreyError(ErrorKind.BAD_INPUT, "Content-Length is not a number") from None
        msg = await receive()
        body = msg.get("body", b"")
        if len(body) > limit:  # a body without Content-Length (chunked) that arrived in one read
            raise _too_large(limit)
        if not msg.get("more_body"):
            return body
        parts = [body]
        size = len(body)
        while msg.get("more_body"):
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise OspreyError(ErrorKind.CANCELLED, "client disconnected")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    @staticmethod
    async def _send(send: Callable, req: Request, response: Response, head: bool) -> None:
        body = response.body
        headers = [(b"content-type", response.content_type.encode("latin-1")),
                   (b"content-length", str(len(body)).encode()),
                   (b"x-request-id", req.request_id.encode("latin-1"))]
        if response.headers:
            for k, v in response.headers.items():
                headers.append((k.encode("latin-1"), str(v).encode("latin-1")))
        if req.cors:
            headers.extend(req.cors)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})
