"""Errors raised by the engine, free of any web framework.

Each class carries its HTTP status and its error ``type`` (API.md "Errors"), so the job
runner stores the type /jvp would answer without asking the web layer;
`app/api/errors.py` is the one place that turns them into responses.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: ``message`` is written for a person, ``param`` names the field at fault."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidExpression(EngineError):
    """Syntax error, or a name or construct the expression language does not allow (400)."""

    status = 400
    type = "invalid_expression"


class TooLarge(EngineError):
    """A body, tensor or expression over a configured limit (413)."""

    status = 413
    type = "too_large"


class InvalidRequest(EngineError):
    """Shapes, names, dtypes, encodings: anything else malformed (422)."""

    status = 422
    type = "invalid_request"


class UnsupportedMediaType(EngineError):
    """A request body in a Content-Type the route does not read (415)."""

    status = 415
    type = "unsupported_media_type"


class NotFound(EngineError):
    """Unknown model, job or session (404)."""

    status = 404
    type = "not_found"


class ForwardADUnsupported(EngineError):
    """An operator without a forward-AD formula; the message names it (501)."""

    status = 501
    type = "forward_ad_unsupported"


class Overloaded(EngineError):
    """The queue is full or the engine is not ready (503)."""

    status = 503
    type = "overloaded"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    """The request passed its deadline (504)."""

    status = 504
    type = "timeout"


class DeviceOutOfMemory(EngineError):
    """The device ran out of memory; the request's memory was released (507)."""

    status = 507
    type = "out_of_memory"


def first_line(e: BaseException, limit: int = 500) -> str:
    """The first line of an error's text (its class name when empty), at most ``limit``
    characters: what a message quotes of a torch error."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
