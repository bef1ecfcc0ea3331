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

    def __init_subclass__(cls, *, status: int = 0, type: str = "", **kw: object) -> None:
        # `class TooLarge(EngineError, status=413, type="too_large")`: its answer, declared once.
        super().__init_subclass__(**kw)
        if status:
            cls.status, cls.type = status, type

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidExpression(EngineError, status=400, type="invalid_expression"):
    """Syntax error, or a name or construct the expression language does not allow (400)."""


class TooLarge(EngineError, status=413, type="too_large"):
    """A body, tensor or expression over a configured limit (413)."""


class InvalidRequest(EngineError, status=422, type="invalid_request"):
    """Shapes, names, dtypes, encodings: anything else malformed (422)."""


class UnsupportedMediaType(EngineError, status=415, type="unsupported_media_type"):
    """A request body in a Content-Type the route does not read (415)."""


class NotFound(EngineError, status=404, type="not_found"):
    """Unknown model, job or session (404)."""


class ForwardADUnsupported(EngineError, status=501, type="forward_ad_unsupported"):
    """An operator without a forward-AD formula; the message names it (501)."""


class ReverseADUnsupported(EngineError, status=501, type="reverse_ad_unsupported"):
    """An operator without a backward (reverse-mode) formula; the message names it (501)."""


class Overloaded(EngineError, status=503, type="overloaded"):
    """The queue is full or the engine is not ready (503)."""

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError, status=504, type="timeout"):
    """The request passed its deadline (504)."""


class DeviceOutOfMemory(EngineError, status=507, type="out_of_memory"):
    """The device ran out of memory; the request's memory was released (507)."""


def first_line(e: BaseException, limit: int = 500) -> str:
    """The first line of an error's text (its class name when empty), at most ``limit``
    characters: what a message quotes of a torch error."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
