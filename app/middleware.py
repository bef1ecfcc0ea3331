"""Pure ASGI middleware: request ids and metrics, and the request-body limit.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that bodies stream through
untouched and the body limit can count bytes as they arrive.

* :class:`RequestContextMiddleware` gives every request an id (the client's
  ``X-Request-ID`` when it is sane: 1 to 128 visible ASCII characters; else a
  new uuid4 hex), puts it in the logging context (app/logs.py) and on the
  response, and records the request in the app's metrics (app/metrics.py).
* :class:`BodyLimitMiddleware` answers 413 ``too_large`` for a body over
  ``JVP_MAX_BODY_BYTES``: at once when ``Content-Length`` says so (the body is
  never read), else as soon as the chunks received pass the limit (chunked
  transfer encoding, or a client that sends more than it declared).
"""

from __future__ import annotations

import random
import re
import time
import uuid
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.logs import request_id
from app.metrics import Metrics

_SANE_ID = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID_HEADER = "X-Request-ID"
SCOPE_REQUEST_ID = "jvp.request_id"  # where app/errors.py finds the id of a failed request
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
        scope[SCOPE_REQUEST_ID] = rid
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


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body passes the limit."""


class BodyLimitMiddleware:
    """413 for request bodies over ``max_body_bytes``, counted while they stream."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self, detail: str) -> Any:
        return error_response(
            413,
            "too_large",
            f"The request body {detail}; the limit is {self.max_body_bytes} bytes "
            "(JVP_MAX_BODY_BYTES)",
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
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return  # whatever the app answers to a cut-off body, the client gets the 413
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await self._too_large(f"passed {self.max_body_bytes} bytes")(scope, receive, send)
