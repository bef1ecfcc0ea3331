"""What the sync and async clients share: configuration and the retry policy.

Nothing here performs I/O. Where the other parts are (a newcomer's map):

- ``_bodies.py``: the request of every operation (``Call``), built by one builder;
- ``_parsing.py``: every answer read by one parser;
- ``_operations.py``: the operations, written once for both clients as plans
  (generators that yield a ``Call`` and get its response back);
- ``_plans.py``: the plan steps, the two drivers (sync, async) and the Protocols
  that the resources (``Job``, ``Linearization``) are typed by;
- ``_client.py``: the two clients: sending with retries, and one line per method.

# NOTE [retries]
A request is retried, up to ``max_retries`` times, after a connection error or
timeout and after a 408, 429, 503 or any other 5xx except 501 (the operator has
no forward-AD formula: retrying cannot help) and 507 (out of device memory: the
same request would most likely run out again). Every request the client sends
is safe to repeat: GETs and DELETEs, ``POST /jvp``, ``/jacobian``, ``/hvp`` and
``/linearize/{id}/jvp`` (pure computations), ``POST /jobs``, which carries one
``Idempotency-Key`` for all its attempts so a retried submission returns the job
already made, and ``POST /linearize``: a 503 (the sessions' memory budget is
spent) made no session, and an attempt that timed out after the service made
one leaves a session nobody knows, which the service drops when it expires.
The delay is the response's ``Retry-After`` (seconds or an HTTP date) when
there is one, capped at ``MAX_RETRY_AFTER_S``; otherwise an exponential backoff
from ``INITIAL_RETRY_DELAY_S`` doubling up to ``MAX_RETRY_DELAY_S``, less up to
25% jitter so clients that failed together do not retry together. Each retry is
logged (INFO) on the ``jvp_client`` logger with the reason and the delay; the
error raised when the retries are spent names the URL, the timeout and the
retries made (``_exceptions.py``).
"""

from __future__ import annotations

import copy
import email.utils
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import httpx

from ._exceptions import APIConnectionError, APITimeoutError, make_status_error
from ._tensors import B64_MIN_ELEMENTS, is_torch_tensor
from ._types import JobInfo, LinearizationInfo
from ._version import __version__

__all__ = [
    "BINARY_MIN_ELEMENTS",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "NOT_GIVEN",
    "BaseClient",
    "Encoding",
    "Limits",
    "OutputKind",
    "REDUCTIONS",
    "Reduction",
    "Retrying",
    "TimeoutTypes",
    "job_path",
    "linearization_path",
    "logger",
    "model_path",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
#: ``POST /jvp`` requests with at least this many elements in all go as safetensors.
BINARY_MIN_ELEMENTS = 65_536
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0

#: Where the client logs its retries (``logging.getLogger("jvp_client")``).
logger = logging.getLogger("jvp_client")

TimeoutTypes = float | httpx.Timeout | None
Encoding = Literal["auto", "json", "b64"]
Reduction = Literal["sum", "mean", "none"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean", "none")
_RETRY_STATUSES = frozenset({408, 429})
_NO_RETRY_STATUSES = frozenset({501, 507})


class _NotGiven:
    """Marks an argument left out, where None means something (``timeout=None``: no timeout)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


@dataclass(frozen=True)
class OutputKind:
    """How decoded tensors are returned: torch tensors (on ``device``) or numpy arrays."""

    as_torch: bool = False
    device: Any = None

    @classmethod
    def of(cls, *maps: Mapping[str, object] | None) -> OutputKind:
        """torch output on the first torch input's device when any input is a torch tensor."""
        for values in maps:
            for value in (values or {}).values():
                if is_torch_tensor(value):
                    return cls(as_torch=True, device=value.device)  # type: ignore[attr-defined]
        return cls()


class Limits(Protocol):
    """The client options a request is built with (``BaseClient`` has them)."""

    b64_min_elements: int
    binary_min_elements: int | None


def _check_count(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        expected = "an int >= 0 or None" if optional else "an int >= 0"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _base_url(base_url: str | httpx.URL | None) -> httpx.URL:
    if base_url is None:
        base_url = os.environ.get("JVP_BASE_URL") or DEFAULT_BASE_URL
    url = httpx.URL(str(base_url))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base_url: expected an http(s) URL, got {str(base_url)!r}")
    # A trailing slash so relative paths join below any prefix (http://host/api/ + jvp).
    return url.copy_with(path=url.path.rstrip("/") + "/")


Self = TypeVar("Self", bound="BaseClient[Any, Any, Any]")
H = TypeVar("H", httpx.Client, httpx.AsyncClient)
L = TypeVar("L")
J = TypeVar("J")


class BaseClient(Generic[H, L, J]):
    """Configuration shared by :class:`JVPClient` and :class:`AsyncJVPClient` (whose
    ``http_client`` is an ``httpx.Client`` and an ``httpx.AsyncClient``: ``_http_type``),
    and the handles the plans ask them for (``_operations.Handles``): a linearization and
    a job of the client's own kind, sync or async (``_linearization_type``, ``_job_type``)."""

    _http_type: type[H]
    _linearization_type: Callable[..., L]
    _job_type: Callable[..., J]
    base_url: httpx.URL
    api_key: str | None
    timeout: TimeoutTypes
    max_retries: int

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes | _NotGiven = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: H | None = None,
        b64_min_elements: int = B64_MIN_ELEMENTS,
        binary_min_elements: int | None = BINARY_MIN_ELEMENTS,
    ) -> None:
        if api_key is None:
            api_key = os.environ.get("JVP_API_KEY") or None
        _check_count("max_retries", max_retries)
        _check_count("b64_min_elements", b64_min_elements)
        _check_count("binary_min_elements", binary_min_elements, optional=True)
        self.base_url = _base_url(base_url)
        self.api_key = api_key
        self.timeout = DEFAULT_TIMEOUT if isinstance(timeout, _NotGiven) else timeout
        self.max_retries = max_retries
        self.b64_min_elements = b64_min_elements
        self.binary_min_elements = binary_min_elements
        if http_client is not None and not isinstance(http_client, self._http_type):
            raise TypeError(
                f"http_client: expected an httpx.{self._http_type.__name__}, "
                f"got {type(http_client).__name__}"
            )
        self._owns_client = http_client is None
        self._client: H = http_client if http_client is not None else self._http_type()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={str(self.base_url)!r})"

    def with_options(
        self: Self,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes | _NotGiven = NOT_GIVEN,
        max_retries: int | None = None,
        b64_min_elements: int | None = None,
        binary_min_elements: int | None | _NotGiven = NOT_GIVEN,
    ) -> Self:
        """A copy of this client with some options changed, sharing its connection pool
        (as ``with_options`` of openai-python): ``client.with_options(timeout=300).jvp(...)``.

        Closing the copy leaves the pool open; closing the original closes it.
        """
        other = copy.copy(self)
        other._owns_client = False
        if base_url is not None:
            other.base_url = _base_url(base_url)
        if api_key is not None:
            other.api_key = api_key
        if not isinstance(timeout, _NotGiven):
            other.timeout = timeout
        if max_retries is not None:
            _check_count("max_retries", max_retries)
            other.max_retries = max_retries
        if b64_min_elements is not None:
            _check_count("b64_min_elements", b64_min_elements)
            other.b64_min_elements = b64_min_elements
        if not isinstance(binary_min_elements, _NotGiven):
            _check_count("binary_min_elements", binary_min_elements, optional=True)
            other.binary_min_elements = binary_min_elements
        return other

    def _linearization(self, info: LinearizationInfo, kind: OutputKind) -> L:
        return self._linearization_type(self, info, kind=kind)

    def _job(self, info: JobInfo, kind: OutputKind, idempotency_key: str | None) -> J:
        return self._job_type(self, info, kind=kind, idempotency_key=idempotency_key)

    def _url(self, path: str) -> httpx.URL:
        return self.base_url.join(path.lstrip("/"))

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"jvp-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            headers.update(extra)
        return headers


class Retrying:
    """One request's attempts: what to do after each failure; see NOTE [retries].

    ``failed``/``answered`` return the seconds to wait before the next attempt, or
    raise the error the caller gets when no retry is left.
    """

    def __init__(
        self, request: httpx.Request, retries: int, ok_statuses: frozenset[int] = frozenset()
    ) -> None:
        self.request = request
        self.retries = retries
        self.ok_statuses = ok_statuses
        self.taken = 0

    def failed(self, exc: httpx.TransportError) -> float:
        """After a connection error or timeout."""
        if self.taken >= self.retries:
            cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
            raise cls.after(exc, request=self.request, retries=self.taken) from exc
        return self._next(f"{type(exc).__name__}: {exc}", None)

    def answered(self, response: httpx.Response) -> float | None:
        """After a response: None when it is the answer, else the delay (or raise)."""
        code = response.status_code
        if response.is_success or code in self.ok_statuses:
            return None
        if self.taken < self.retries and _should_retry(code):
            return self._next(f"HTTP {code}", response)
        raise make_status_error(response)

    def _next(self, reason: str, response: httpx.Response | None) -> float:
        delay = _retry_delay_s(self.taken, response)
        self.taken += 1
        logger.info(
            "Retrying %s %s in %.2f s (retry %d of %d) after %s",
            self.request.method,
            self.request.url,
            delay,
            self.taken,
            self.retries,
            reason,
        )
        return delay


def _should_retry(code: int) -> bool:
    """See NOTE [retries]."""
    if code in _NO_RETRY_STATUSES:
        return False
    return code in _RETRY_STATUSES or code >= 500


def _retry_after_s(response: httpx.Response | None) -> float | None:
    """The delay a response asks for (``Retry-After``/``Retry-After-Ms``), or None."""
    if response is None:
        return None
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _retry_delay_s(retries_taken: int, response: httpx.Response | None) -> float:
    """How long to wait before retry number ``retries_taken + 1``; see NOTE [retries]."""
    retry_after = _retry_after_s(response)
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    delay = min(INITIAL_RETRY_DELAY_S * 2.0**retries_taken, MAX_RETRY_DELAY_S)
    return delay * (1.0 - 0.25 * random.random())


def _checked_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"expected a {what}, got {value!r}")
    return value


def job_path(job_id: str) -> str:
    return f"jobs/{_checked_id(job_id, 'job id')}"


def linearization_path(session_id: str) -> str:
    return f"linearize/{_checked_id(session_id, 'linearize session id')}"


def model_path(name: str) -> str:
    return f"models/{_checked_id(name, 'model name')}"
