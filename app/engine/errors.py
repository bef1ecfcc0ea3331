"""Errors raised by the engine, free of any web framework.

`app/errors.py` maps each class to its HTTP status and error ``type``; nothing
else in the project decides status codes.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: ``message`` is written for a person, ``param`` names the field at fault."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidExpression(EngineError):
    """Syntax error, or a name or construct the expression language does not allow (400)."""


class TooLarge(EngineError):
    """A body, tensor or expression over a configured limit (413)."""


class InvalidRequest(EngineError):
    """Shapes, names, dtypes, encodings: anything else malformed (422)."""


class UnsupportedMediaType(EngineError):
    """A request body in a Content-Type the route does not read (415)."""


class NotFound(EngineError):
    """Unknown model, job or session (404)."""


class ForwardADUnsupported(EngineError):
    """An operator without a forward-AD formula; the message names it (501)."""


class ReverseADUnsupported(EngineError):
    """An operator without a backward (reverse-mode) formula; the message names it (501)."""


class Overloaded(EngineError):
    """The queue is full or the engine is not ready (503)."""

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    """The request passed its deadline (504)."""


class DeviceOutOfMemory(EngineError):
    """The device ran out of memory; the request's memory was released (507)."""
