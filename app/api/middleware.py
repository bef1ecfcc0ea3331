"""Pure ASGI middleware: request ids and metrics, the key before the body, and the
request body's limits (size and time).

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that bodies stream through
untouched and the body limit can count bytes as they arrive.

* :class:`RequestContextMiddleware` gives every request an id (the client's
  ``X-Request-ID`` when it is sane: 1 to 128 visible ASCII characters; else a
  new uuid4 hex), puts it in the logging context (app/logs.py) and on the
  response, and records the request in the app's metrics (app/metrics.py).
* :class:`KeyFirstMiddleware` answers 401/403 from the headers alone, before
  anything reads the body (NOTE [the key before the body]).
* :class:`BodyLimitMiddleware` answers 413 ``too_large`` for a body over
  ``JVP_MAX_BODY_BYTES``: at once when ``Content-Length`` says so (the body is
  never read), else as soon as the chunks received pass the limit (chunked
  transfer encoding, or a client that sends more than it declared); and 408
  ``timeout`` for a body that has not arrived within ``JVP_BODY_TIMEOUT_S`` of
  the request's start (the connection is closed: a client that stops sending
  holds nothing).

# NOTE [the key before the body]
FastAPI reads and parses a route's body before it solves the route's
dependencies, so a key check written as a dependency (`app.api.auth.KeyDep`) ran
after a 100 MB body had been read and JSON-parsed (600 MiB of RSS, seconds of
CPU, for a request without a key). `KeyFirstMiddleware` runs the check each
route declares (`app.api.auth.guard_for` reads the route's dependencies: the
declaration stays the one place that says which key a route needs) from the
headers, before the route is reached; the dependency runs again afterwards, a
few microseconds. A refused request with a body gets ``Connection: close``:
uvicorn drops the connection instead of reading the rest. With no keys
configured the middleware costs one attribute look-up.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import guard_for
from app.api.errors import error_response, handled_response
from app.engine.errors import EngineError
from app.logs import request_id
from app.metrics import Metrics

_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")
SCOPE_ARRIVED = "jvp.arrived"  # time.monotonic() at arrival: a request's deadline starts here
UNMATCHED = "unmatched"  # the route label of requests that match no route (404s)


def new_request_id(given: str | None) -> str:
    """The client's id when it is 1 to 128 visible ASCII characters, else a new uuid4 hex.

    >>> new_request_id("req-42")
    'req-42'
    >>> len(new_request_id("has space"))
    32
    """
    if given is not None and _SANE_ID.fullmatch(given):
        return given
    # A version-4 UUID from the process's PRNG: ids need to be unique, not secret, and
    # uuid.uuid4() makes a system call per request.
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def route_label(scope: Scope) -> str:
    """The route template that served this request (``/models/{name}``), never the raw path
    (whose values a client chooses: one label each would grow the metrics without bound)."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    # Answered before routing (the body limit): the documented path template it matches.
    app = scope.get("app")
    if app is None or not hasattr(app, "openapi"):
        return UNMATCHED
    templates = _templates(app)
    for regex, template in templates:
        if regex.fullmatch(scope.get("path", "")):
            return template
    return UNMATCHED


def _templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    cached: list[tuple[re.Pattern[str], str]] | None = getattr(app.state, "_route_templates", None)
    if cached is None:
        cached = [(compile_path(t)[0], t) for t in app.openapi().get("paths", {})]
        app.state._route_templates = cached
    return cached


class RequestContextMiddleware:
    """Request id (logs, response header) and per-request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(_header(scope, b"x-request-id"))
        # Each request runs in a task of its own, so the value stays with this request
        # (and is still set when the outermost error handler logs a 500).
        request_id.set(rid)
        scope[SCOPE_ARRIVED] = time.monotonic()
        started = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(
                route_label(scope),
                scope.get("method", ""),
                str(status),
                time.perf_counter() - started,
            )


def _has_body(scope: Scope) -> bool:
    declared = _header(scope, b"content-length")
    if declared is not None:
        return declared.strip() not in ("", "0")
    return _header(scope, b"transfer-encoding") is not None


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class KeyFirstMiddleware:
    """401/403 from the headers, before the body is read (NOTE [the key before the body])."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            app = scope["app"]
            settings = app.state.settings
            if settings.api_keys or settings.admin_keys:
                guard = guard_for(app, scope["method"], _route_path(scope))
                if guard is not None:
                    request = Request(scope)
                    try:
                        await guard(request)
                    except EngineError as exc:
                        response = handled_response(request, exc)
                        assert response is not None  # Unauthorized, Forbidden: mapped errors
                        if _has_body(scope):
                            response.headers["Connection"] = "close"
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body passes the limit."""


class _BodyTimeout(Exception):
    """Raised into the app from ``receive`` once the body is late (JVP_BODY_TIMEOUT_S)."""


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _BodyDeadlines:
    """Deadlines of the body reads in progress, kept by one sweep (NOTE [one timer for
    every body]).

    # NOTE [one timer for every body]
    ``asyncio.timeout_at`` around each ``receive()`` schedules and cancels a timer per
    call: 8-11 µs each on this project's 2-core machine, 4% of a small /jvp. Instead a
    read registers its task and deadline (a dict entry), and one sweep every `period_s`
    (armed by a read when none is, re-armed only while reads wait: at most one timer per
    period under any load, none when idle) cancels the reads past their deadline; the
    cancelled read turns that into the 408, at most `period_s` late.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.period_s = min(0.1, timeout_s / 10)
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._late: set[asyncio.Task[Any]] = set()
        self._armed: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def receive(self, receive: Receive, deadline: float) -> Message:
        """``receive()``, or `_BodyTimeout` once ``deadline`` (loop time) has passed."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        if loop is not self._loop:  # a new event loop (tests start several): a fresh sweep
            self._loop, self._armed = loop, None
            self._waiting.clear()
            self._late.clear()
        if loop.time() >= deadline:
            raise _BodyTimeout
        self._waiting[task] = deadline
        if self._armed is None:
            self._armed = loop.call_later(self.period_s, self._sweep)
        try:
            return await receive()
        except asyncio.CancelledError:
            if task not in self._late:
                raise
            self._late.discard(task)
            task.uncancel()
            raise _BodyTimeout from None
        finally:
            self._waiting.pop(task, None)

    def _sweep(self) -> None:
        assert self._loop is not None
        self._armed = None
        now = self._loop.time()
        for task, deadline in list(self._waiting.items()):
            if deadline <= now:
                del self._waiting[task]
                self._late.add(task)
                task.cancel()
        if self._waiting:
            self._armed = self._loop.call_later(self.period_s, self._sweep)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_body_bytes``, counted while they stream; 408 for a
    body still arriving ``body_timeout_s`` after the request started (None: no deadline)."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self._deadlines = None if body_timeout_s is None else _BodyDeadlines(body_timeout_s)

    def _too_large(self, detail: str) -> Any:
        return error_response(
            413,
            "too_large",
            f"The request body {detail}; the limit is {self.max_body_bytes} bytes "
            "(JVP_MAX_BODY_BYTES)",
            "body",
            headers={"Connection": "close"},
        )

    def _late(self, received: int, declared: str | None) -> Any:
        of = f" of {declared}" if declared is not None and declared.strip().isdigit() else ""
        return error_response(
            408,
            "timeout",
            f"The request body stopped arriving: {received}{of} bytes came in "
            f"{self.body_timeout_s:g} s, the limit (JVP_BODY_TIMEOUT_S)",
            "body",
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit():
            size = int(declared)
            if size > self.max_body_bytes:
                await self._too_large(f"has {size} bytes")(scope, receive, send)
                return

        received = 0
        exceeded = late = False
        body_done = False
        response_started = False
        deadlines = self._deadlines
        deadline = 0.0 if deadlines is None else _loop_time() + deadlines.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, exceeded, late, body_done
            if body_done or deadlines is None:
                message = await receive()  # the body is in: waiting for a disconnect is fine
            else:
                try:
                    message = await deadlines.receive(receive, deadline)
                except _BodyTimeout:
                    late = True
                    raise
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if (exceeded or late) and not response_started:
                return  # whatever the app answers to a cut-off body, the client gets the 413/408
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (exceeded or late):
                raise
        if response_started:
            return
        if exceeded:
            await self._too_large(f"passed {self.max_body_bytes} bytes")(scope, receive, send)
        elif late:
            await self._late(received, declared)(scope, receive, send)
