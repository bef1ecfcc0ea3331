"""The one place that maps exceptions to HTTP statuses and error bodies (API.md "Errors").

Every error is ``{"error": {"type", "message", "param"}}``.
"""

from __future__ import annotations

import logging
import reprlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import compile_path

from app.api.responses import ORJSONResponse
from app.engine import errors as engine_errors
from app.logs import request_id
from app.schemas import ErrorBody

log = logging.getLogger(__name__)


class Unauthorized(engine_errors.EngineError, status=401, type="unauthorized"):
    """No API key, or a wrong one (401)."""


class Forbidden(engine_errors.EngineError, status=403, type="forbidden"):
    """A valid key without the rights this route needs (403)."""


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each status documented with the one error body."""
    return {status: {"model": ErrorBody} for status in statuses}


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"type": type_, "message": message, "param": param}}
    return ORJSONResponse(body, status_code=status, headers=headers)


def _engine_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, engine_errors.EngineError)
    status, type_ = exc.status, exc.type  # each class carries its own (app/engine/errors.py)
    headers = None
    if isinstance(exc, engine_errors.Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    if status >= 500:
        log.warning("%d %s (request %s): %s", status, type_, request_id.get(), exc.message)
    return error_response(status, type_, exc.message, exc.param, headers)


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if not errors:
        return error_response(422, "invalid_request", "The request body is not valid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(
            422, "invalid_request", f"The body is not valid JSON: {detail}".rstrip(": "), "body"
        )
    where = _location(tuple(first.get("loc", ())))
    message = f"{where}: {first.get('msg', 'invalid')}"
    if first.get("type") == "missing":
        message = f"Missing required field '{where}'"
    elif first.get("type") == "extra_forbidden":
        message = f"Unknown field '{where}'"
    elif "input" in first and first.get("type") != "model_attributes_type":
        message += f", got {_short(first['input'])}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return error_response(422, "invalid_request", message, where)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # JSON nested ~1000 deep (orjson's limit is 1024): the outer levels
        text = _OUTER.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_OUTER = reprlib.Repr()
_OUTER.maxlevel = 3


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(404, "not_found", f"No route {request.method} {request.url.path}")
    if exc.status_code == 405:
        # RFC 9110 requires Allow on a 405: every method of the path, not only those of the
        # first route Starlette tried.
        allow = _allowed_methods(request)
        return error_response(
            405,
            "invalid_request",
            f"Method {request.method} is not allowed on {request.url.path}",
            headers={"Allow": allow} if allow else dict(exc.headers or {}),
        )
    return error_response(
        exc.status_code, "invalid_request", str(exc.detail), headers=dict(exc.headers or {})
    )


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].fullmatch(request.url.path):
            methods |= {m.upper() for m in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def unexpected_response(request: Request, exc: BaseException) -> Response:
    """The logged 500 of an error no handler maps (also used by app/api/fastpath.py)."""
    # Runs outside the request-id middleware (Starlette's outermost error handler), so the
    # response gets its X-Request-ID here; the id is still in the logging context.
    rid = request_id.get()
    log.exception(
        "unexpected error on %s %s (request %s)",
        request.method,
        request.url.path,
        rid,
        exc_info=exc,
    )
    return error_response(
        500,
        "internal_error",
        f"Internal error (request id {rid}); the service keeps serving",
        headers={"X-Request-ID": rid} if rid else None,
    )


# Exception class -> its handler; anything else is a 500 (`unexpected_response`).
_HANDLERS = {
    engine_errors.EngineError: _engine_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
}


def handled_response(request: Request, exc: Exception) -> Response | None:
    """The error response the app's handlers give ``exc``, or None for an unexpected error
    (which the caller re-raises, for the outermost handler to log and answer 500). For code
    that runs before the router (app/api/fastpath.py)."""
    for cls, handler in _HANDLERS.items():
        if isinstance(exc, cls):
            return handler(request, exc)
    return None


def install(app: FastAPI) -> None:
    for cls, handler in _HANDLERS.items():
        app.add_exception_handler(cls, handler)
    app.add_exception_handler(Exception, unexpected_response)
