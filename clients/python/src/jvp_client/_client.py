"""The sync and async clients: sending with retries, and one line per operation.

The operations themselves are in ``_operations.py`` (NOTE [adding an operation]).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from . import _jobs as job_ops
from . import _operations as ops
from . import _solve as solve_ops
from . import _vjp as vjp_ops
from ._base import (
    NOT_GIVEN,
    BaseClient,
    Retrying,
)
from ._jobs import AsyncJob, Job
from ._linearize import AsyncLinearization, Linearization
from ._plans import (
    AsyncClosesOnExit,
    Call,
    ClosesOnExit,
    aiterate,
    async_method,
    awaited,
    complete,
    iterate,
    sync_method,
)
from ._types import JobInfo

__all__ = ["AsyncJVPClient", "JVPClient"]


def _build(
    client: BaseClient[Any, Any, Any], http: httpx.Client | httpx.AsyncClient, call: Call
) -> Any:
    """The httpx request of ``call`` (sync and async alike)."""
    headers = client._headers(call.headers)
    content = call.content
    if call.json_body is not None:
        # allow_nan=False: JSON has no NaN; tensors spell it "NaN" (see _tensors.py).
        content = json.dumps(call.json_body, allow_nan=False, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    timeout = client.timeout if call.timeout is NOT_GIVEN else call.timeout
    return http.build_request(
        call.method,
        client._url(call.path),
        content=content,
        params=call.params,
        headers=headers,
        timeout=timeout,
    )


def _retrying(client: BaseClient[Any, Any, Any], request: httpx.Request, call: Call) -> Retrying:
    retries = client.max_retries if call.max_retries is None else call.max_retries
    return Retrying(request, retries, call.ok_statuses)


async def _send(
    client: JVPClient | AsyncJVPClient, http: httpx.Client | httpx.AsyncClient, call: Call
) -> httpx.Response:
    """Send ``call`` with ``http``, retrying as NOTE [retries] says; written once for both
    clients (NOTE [one driver]: the sync client's calls block and are not awaited)."""
    request = _build(client, http, call)
    attempts = _retrying(client, request, call)
    while True:
        try:
            response: httpx.Response = await awaited(http.send(request))
        except httpx.TransportError as exc:
            await awaited(client._sleep(attempts.failed(exc)))
            continue
        delay = attempts.answered(response)
        if delay is None:
            return response
        if isinstance(http, httpx.AsyncClient):
            await response.aclose()
        else:
            response.close()
        await awaited(client._sleep(delay))


class JVPClient(ClosesOnExit, BaseClient[httpx.Client, Linearization, Job]):
    """A synchronous client of the JVP service.

    Args:
        base_url: the service's URL; default ``$JVP_BASE_URL``, else ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>``; default ``$JVP_API_KEY``.
        timeout: seconds (or an ``httpx.Timeout``) per attempt; None waits forever.
        max_retries: retries after a connection error, 408, 429, 503 or other 5xx
            (not 501 or 507), see NOTE [retries] in ``_base.py``; logged on the
            ``jvp_client`` logger.
        http_client: an ``httpx.Client`` to send with (a ``fastapi.testclient.TestClient``
            works too); the client does not close one it was given.
        b64_min_elements: tensors with at least this many elements travel base64.
        binary_min_elements: a :meth:`jvp` whose tensors hold at least this many
            elements in all goes as a safetensors file and is answered in one
            (NOTE [binary bodies] in ``_bodies.py``); None: always JSON.

    ``client.with_options(timeout=...)`` is a copy with other options on the same pool.

    Example::

        >>> import numpy as np
        >>> from jvp_client import JVPClient
        >>> with JVPClient() as client:  # doctest: +SKIP
        ...     out, jvp = client.jvp(expression="x**2", primals={"x": np.arange(3.0)},
        ...                           tangents={"x": np.ones(3)})
        >>> jvp  # doctest: +SKIP
        array([0., 2., 4.])
    """

    _http_type = httpx.Client
    _linearization_type = Linearization
    _job_type = Job

    def close(self) -> None:
        """Close the underlying connection pool (unless it was passed in as ``http_client``)."""
        if self._owns_client:
            self._client.close()

    @property
    def _runner(self) -> JVPClient:
        return self

    def _sleep(self, seconds: float) -> None:
        """Wait between retries and job polls (tests replace it to record the delays)."""
        time.sleep(seconds)

    def _send(self, call: Call) -> httpx.Response:
        """Send one request, retrying as NOTE [retries] says; raise for error statuses."""
        return complete(_send(self, self._client, call))

    jvp = sync_method(ops.jvp)
    jacobian = sync_method(ops.jacobian)
    hvp = sync_method(ops.hvp)
    eval_shape = sync_method(ops.eval_shape)
    linearize = sync_method(ops.linearize)
    vjp = sync_method(vjp_ops.vjp)
    solve = sync_method(solve_ops.solve)
    models = sync_method(ops.models)
    model = sync_method(ops.model)
    load_model = sync_method(ops.load_model)
    unload_model = sync_method(ops.unload_model)
    health = sync_method(ops.health)
    submit_job = sync_method(job_ops.submit_job)
    get_job = sync_method(job_ops.get_job)
    list_jobs = sync_method(job_ops.list_jobs)

    def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> Iterator[JobInfo]:
        """Every job (only those in ``status`` when given), newest first, fetched a page
        (``page_size`` jobs) at a time as the loop asks for them."""
        return iterate(self, job_ops.iter_jobs(status, page_size))

    def linear_operator(self, **kwargs: Any) -> Any:
        """The Jacobian at a point as a ``scipy.sparse.linalg.LinearOperator`` (needs the
        ``scipy`` extra); see :func:`jvp_client.scipy.linear_operator`."""
        from .scipy import linear_operator

        return linear_operator(self, **kwargs)

    def least_squares_jac(self, **kwargs: Any) -> Any:
        """A ``jac=`` for ``scipy.optimize.least_squares(..., tr_solver="lsmr")``; see
        :func:`jvp_client.scipy.least_squares_jac`."""
        from .scipy import least_squares_jac

        return least_squares_jac(self, **kwargs)


class AsyncJVPClient(
    AsyncClosesOnExit, BaseClient[httpx.AsyncClient, AsyncLinearization, AsyncJob]
):
    """The asyncio twin of :class:`JVPClient`: the same arguments, methods awaited.

    ``http_client`` is an ``httpx.AsyncClient`` (``httpx.ASGITransport`` serves an app
    in-process).
    """

    _http_type = httpx.AsyncClient
    _linearization_type = AsyncLinearization
    _job_type = AsyncJob

    async def close(self) -> None:
        """Close the underlying connection pool (unless it was passed in as ``http_client``)."""
        if self._owns_client:
            await self._client.aclose()

    @property
    def _runner(self) -> AsyncJVPClient:
        return self

    async def _sleep(self, seconds: float) -> None:
        """Wait between retries and job polls (tests replace it to record the delays)."""
        await asyncio.sleep(seconds)

    async def _send(self, call: Call) -> httpx.Response:
        """Send one request, retrying as NOTE [retries] says; raise for error statuses."""
        return await _send(self, self._client, call)

    jvp = async_method(ops.jvp)
    jacobian = async_method(ops.jacobian)
    hvp = async_method(ops.hvp)
    eval_shape = async_method(ops.eval_shape)
    linearize = async_method(ops.linearize)
    vjp = async_method(vjp_ops.vjp)
    solve = async_method(solve_ops.solve)
    models = async_method(ops.models)
    model = async_method(ops.model)
    load_model = async_method(ops.load_model)
    unload_model = async_method(ops.unload_model)
    health = async_method(ops.health)
    submit_job = async_method(job_ops.submit_job)
    get_job = async_method(job_ops.get_job)
    list_jobs = async_method(job_ops.list_jobs)

    def iter_jobs(
        self, *, status: str | None = None, page_size: int = 100
    ) -> AsyncIterator[JobInfo]:
        """``async for job in client.iter_jobs(...)``; see :meth:`JVPClient.iter_jobs`."""
        return aiterate(self, job_ops.iter_jobs(status, page_size))
