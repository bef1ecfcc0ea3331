"""Exceptions raised by the JVP client.

Every error the client raises for the service derives from :class:`JVPError`::

    JVPError
    ├── APIConnectionError              the request never got an answer
    │   └── APITimeoutError             ... because it timed out
    ├── APIResponseValidationError      a 2xx answer the client cannot read
    └── APIStatusError                  the service answered 4xx/5xx
        ├── BadRequestError             400 invalid_expression
        ├── AuthenticationError         401 unauthorized
        ├── PermissionDeniedError       403 forbidden
        ├── NotFoundError               404 not_found
        ├── PayloadTooLargeError        413 too_large
        ├── UnprocessableEntityError    422 invalid_request
        ├── ADUnsupportedError          501 an operator without a derivative formula
        │   ├── ForwardADUnsupportedError   forward_ad_unsupported (/jvp and the others)
        │   └── ReverseADUnsupportedError   reverse_ad_unsupported (/vjp, Jᵀ·u)
        ├── OverloadedError             503 overloaded
        ├── DeadlineExceededError       504 timeout
        ├── OutOfMemoryError            507 out_of_memory
        └── InternalServerError         any other 5xx

An :class:`APIStatusError` carries ``status_code``, the error ``type``,
``message`` and ``param`` from the body
(``{"error": {"type", "message", "param"}}``), the ``request_id`` from the
``X-Request-ID`` response header, and the decoded ``body``.

Arguments the client can reject without asking the service raise the builtin
``TypeError`` / ``ValueError`` instead.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "ADUnsupportedError",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "DeadlineExceededError",
    "ForwardADUnsupportedError",
    "InternalServerError",
    "JVPError",
    "NotFoundError",
    "OutOfMemoryError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ReverseADUnsupportedError",
    "UnprocessableEntityError",
]


class JVPError(Exception):
    """Base class of every error raised for the JVP service."""

    message: str

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(JVPError):
    """The request failed before a response came back (DNS, refused, reset, ...).

    Raised after the retries: ``url``, ``timeout`` (the request's, in seconds per
    phase) and ``retries`` (how many were made) say what was tried, and the
    message suggests what to check.
    """

    def __init__(
        self,
        message: str = "Connection error.",
        *,
        request: httpx.Request,
        retries: int = 0,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.url = str(request.url)
        self.timeout: dict[str, float | None] = dict(request.extensions.get("timeout") or {})
        self.retries = retries

    @classmethod
    def after(
        cls, exc: httpx.TransportError, *, request: httpx.Request, retries: int
    ) -> APIConnectionError:
        """The error for ``exc``, the last attempt's, once ``retries`` retries were made."""
        timeout = _timeout_text(request)
        retried = f"{retries} retr{'y' if retries == 1 else 'ies'}"
        tried = f"{retries + 1} attempt{'s' if retries else ''} ({retried})"
        if issubclass(cls, APITimeoutError):
            message = (
                f"Request timed out: {request.method} {request.url} got no answer within its "
                f"timeout ({timeout}) in {tried}; last error: {type(exc).__name__}: {exc}. "
                "Check that the service is not overloaded (`jvp health`), or allow more time "
                "(timeout=..., client.with_options(timeout=...), `jvp --timeout S`); long work "
                "fits a batch job (submit_job)."
            )
            return APITimeoutError(message, request=request, retries=retries)
        message = (
            f"Connection error: {request.method} {request.url} failed in {tried} "
            f"(timeout {timeout}): {type(exc).__name__}: {exc}. Check that the service is "
            "running and reachable at that URL (`jvp health`), and base_url= / JVP_BASE_URL "
            "/ `jvp --base-url`."
        )
        return cls(message, request=request, retries=retries)


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read, write or pool timeout)."""

    def __init__(
        self, message: str = "Request timed out.", *, request: httpx.Request, retries: int = 0
    ) -> None:
        super().__init__(message, request=request, retries=retries)


def _timeout_text(request: httpx.Request) -> str:
    """``"60 s"``, or ``"connect 10 s, read 60 s, ..."`` when the phases differ."""
    phases: dict[str, float | None] = dict(request.extensions.get("timeout") or {})
    if not phases:
        return "none"

    def text(value: float | None) -> str:
        return "none" if value is None else f"{value:g} s"

    values = set(phases.values())
    if len(values) == 1:
        return f"{text(values.pop())} per attempt"
    return ", ".join(f"{name} {text(value)}" for name, value in phases.items()) + " per attempt"


class APIResponseValidationError(JVPError):
    """The service answered 2xx with a body the client cannot read."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any = None) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.body = body


class APIStatusError(JVPError):
    """The service answered with a 4xx or 5xx status."""

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        body: Any,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.response = response
        self.status_code: int = response.status_code
        self.type = type
        self.param = param
        self.body = body
        self.request_id: str | None = response.headers.get("x-request-id")

    def __str__(self) -> str:
        head = f"{self.status_code} {self.type}" if self.type else f"{self.status_code}"
        text = f"{head}: {self.message}"
        if self.param:
            text += f" (param: {self.param})"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text


class BadRequestError(APIStatusError):
    """400: the expression does not parse, uses a forbidden construct, or passes a limit."""


class AuthenticationError(APIStatusError):
    """401: API keys are configured and the request had none, or a wrong one."""


class PermissionDeniedError(APIStatusError):
    """403: an inference key was used on an admin route."""


class NotFoundError(APIStatusError):
    """404: unknown model, job or route."""


class PayloadTooLargeError(APIStatusError):
    """413: a body, tensor or expression over its limit."""


class UnprocessableEntityError(APIStatusError):
    """422: shapes, names, dtypes, encodings or anything else malformed."""


class ADUnsupportedError(APIStatusError):
    """501: an operator without a derivative formula in the mode the route needs; the
    message names it. ``except ADUnsupportedError`` catches both modes."""


class ForwardADUnsupportedError(ADUnsupportedError):
    """501 ``forward_ad_unsupported``: an operator without a forward-AD formula (and any 501
    whose type the client does not know, as before reverse mode existed)."""


class ReverseADUnsupportedError(ADUnsupportedError):
    """501 ``reverse_ad_unsupported``: an operator without a backward (reverse-mode) formula,
    from ``/vjp``, ``Linearization.vjp`` or an ``rmatvec``."""


class OverloadedError(APIStatusError):
    """503: the queue is full or the engine is not ready (retried by default)."""


class DeadlineExceededError(APIStatusError):
    """504: the request passed its deadline on the service."""


class OutOfMemoryError(APIStatusError):
    """507: the device ran out of memory (the service keeps serving)."""


class InternalServerError(APIStatusError):
    """Any other 5xx."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    501: ForwardADUnsupportedError,
    503: OverloadedError,
    504: DeadlineExceededError,
    507: OutOfMemoryError,
}


# Where one status carries several error types, the type picks the class.
_TYPE_ERRORS: dict[tuple[int, str], type[APIStatusError]] = {
    (501, "reverse_ad_unsupported"): ReverseADUnsupportedError,
}


def error_class_for_status(status_code: int, type: str | None = None) -> type[APIStatusError]:
    """The exception class for an error status (and its wire ``type``): a subclass, or
    APIStatusError itself."""
    if type is not None and (status_code, type) in _TYPE_ERRORS:
        return _TYPE_ERRORS[status_code, type]
    if status_code in _STATUS_ERRORS:
        return _STATUS_ERRORS[status_code]
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


def make_status_error(response: httpx.Response) -> APIStatusError:
    """Build the exception for an error response (its body must have been read)."""
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text or None
    err_type: str | None = None
    param: str | None = None
    message: str | None = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            err_type = _str_or_none(err.get("type"))
            message = _str_or_none(err.get("message"))
            param = _str_or_none(err.get("param"))
        elif isinstance(body.get("detail"), str):  # a bare framework error
            message = body["detail"]
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:1000]
    if not message:
        reason = response.reason_phrase or "error"
        message = f"HTTP {response.status_code} {reason}"
    cls = error_class_for_status(response.status_code, err_type)
    return cls(message, response=response, body=body, type=err_type, param=param)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
