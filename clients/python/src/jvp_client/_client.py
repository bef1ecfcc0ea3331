"""The sync and async clients; both build on :class:`jvp_client._base.BaseClient`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from . import _vjp
from ._base import (
    B64_MIN_ELEMENTS,
    BINARY_MIN_ELEMENTS,
    DEFAULT_MAX_RETRIES,
    NOT_GIVEN,
    BaseClient,
    Encoding,
    OutputKind,
    Reduction,
    TimeoutTypes,
    job_path,
    model_path,
)
from ._exceptions import APIConnectionError, APITimeoutError, make_status_error
from ._jobs import AsyncJob, Job
from ._linearize import AsyncLinearization, Linearization
from ._types import (
    EvalShapeResult,
    HealthStatus,
    HVPResult,
    JacobianResult,
    JobInfo,
    JVPResult,
    ModelInfo,
)
from ._vjp import VJPResult

__all__ = ["AsyncJVPClient", "JVPClient"]

_Tensors = Mapping[str, Any]


def _new_idempotency_key() -> str:
    return f"jvp-{uuid.uuid4().hex}"


class JVPClient(BaseClient):
    """A synchronous client of the JVP service.

    Args:
        base_url: the service's URL; default ``$JVP_BASE_URL``, else ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>``; default ``$JVP_API_KEY``.
        timeout: seconds (or an ``httpx.Timeout``) per attempt; None waits forever.
        max_retries: retries after a connection error, 408, 429, 503 or other 5xx
            (not 501 or 507), see NOTE [retries] in ``_base.py``.
        http_client: an ``httpx.Client`` to send with (a ``fastapi.testclient.TestClient``
            works too); the client does not close one it was given.
        b64_min_elements: tensors with at least this many elements travel base64.
        binary_min_elements: a :meth:`jvp` whose tensors hold at least this many
            elements in all goes as a safetensors file and is answered in one
            (NOTE [binary bodies] in ``_base.py``); None: always JSON.

    Example::

        >>> import numpy as np
        >>> from jvp_client import JVPClient
        >>> with JVPClient() as client:  # doctest: +SKIP
        ...     r = client.jvp(expression="x**2", primals={"x": np.arange(3.0)},
        ...                    tangents={"x": np.ones(3)})
        >>> r.jvp  # doctest: +SKIP
        array([0., 2., 4.])
    """

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
        b64_min_elements: int = B64_MIN_ELEMENTS,
        binary_min_elements: int | None = BINARY_MIN_ELEMENTS,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            b64_min_elements=b64_min_elements,
            binary_min_elements=binary_min_elements,
        )
        if http_client is not None and not isinstance(http_client, httpx.Client):
            raise TypeError(
                f"http_client: expected an httpx.Client, got {type(http_client).__name__}"
            )
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else httpx.Client()

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying connection pool (unless it was passed in as ``http_client``)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> JVPClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        """Wait between retries and job polls (tests replace it to record the delays)."""
        time.sleep(seconds)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
        max_retries: int | None = None,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """Send one request, retrying as NOTE [retries] says; raise for error statuses."""
        request = self._client.build_request(
            **self._request_parts(
                method,
                path,
                json_body=json_body,
                content=content,
                params=params,
                headers=headers,
                timeout=timeout,
            )
        )
        retries = self.max_retries if max_retries is None else max_retries
        retries_taken = 0
        while True:
            try:
                response = self._client.send(request)
            except httpx.TimeoutException as exc:
                if retries_taken < retries:
                    self._sleep(self._retry_delay_s(retries_taken, None))
                    retries_taken += 1
                    continue
                raise APITimeoutError(request=request) from exc
            except httpx.TransportError as exc:
                if retries_taken < retries:
                    self._sleep(self._retry_delay_s(retries_taken, None))
                    retries_taken += 1
                    continue
                raise APIConnectionError(f"Connection error: {exc}", request=request) from exc
            if response.is_success or response.status_code in ok_statuses:
                return response
            if retries_taken < retries and self._should_retry(response):
                delay = self._retry_delay_s(retries_taken, response)
                response.close()
                self._sleep(delay)
                retries_taken += 1
                continue
            raise make_status_error(response)

    # -- API ------------------------------------------------------------------------------

    def jvp(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        dtype: object = None,
        device: str | None = None,
        engine: str | None = None,
        fallback: str | None = None,
        encoding: Encoding = "auto",
        tangent_batch: bool = False,
        check: bool = False,
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> JVPResult:
        """``POST /jvp``: the function's output and its JVP along ``tangents``.

        Args:
            expression: an expression whose free variables are the inputs, or
            model: a registered model's name (exactly one of the two).
            primals: ``{input name: tensor}``: numpy arrays, torch tensors (then the
                result holds torch tensors), Python numbers or nested lists.
            tangents: per input, same shape as its primal; inputs left out get zero.
            parameter_tangents: models only: tangents for parameters by name.
            dtype: computation dtype (``"float32"``, ``torch.float64``, ...); default:
                the dtype the floating primal arrays share, else the service's (float32).
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            engine: ``"dual"`` or ``"functional"``.
            fallback: ``"auto"`` or ``"none"``.
            encoding: ``"auto"`` (base64 answers when base64 went out), ``"json"``, ``"b64"``;
                unused when the request goes as safetensors (``binary_min_elements``).
            tangent_batch: every tangent has a leading dimension K (the same for all):
                ``jvp`` then has that leading K, J·v for K directions in one call.
            check: also compare the JVP with float64 central finite differences
                (``result.check``, a :class:`GradientCheck`).
            options: more ``options`` fields, sent as they are.
            timeout: this request's timeout, instead of the client's.

        Returns:
            :class:`JVPResult` with ``output`` and ``jvp`` (lists for several outputs),
            ``timing_ms``, ``device``, ``dtype``, ``engine``, ``method`` and ``check``.
        """
        request, kind = self._jvp_request(
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=encoding,
            options=options,
            tangent_batch=tangent_batch,
            check=check,
        )
        response = self._request("POST", "jvp", **request, timeout=timeout)
        return self._parse_jvp(response, kind)

    def jacobian(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        wrt: str | Sequence[str] | None = None,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> JacobianResult:
        """``POST /jacobian``: the full Jacobian at ``primals``, computed by forward mode.

        Args:
            expression, model, primals, dtype, device, encoding, timeout: as for :meth:`jvp`.
            wrt: the input and parameter names to differentiate by (one name may be a
                str); default all inputs.
            options: more ``options`` fields, sent as they are.

        Returns:
            :class:`JacobianResult`: ``output`` and ``jacobian``, ``{name: array}`` of
            shape output shape + that input's shape (lists of both for several outputs).
        """
        body, kind = self._jacobian_body(
            where="jacobian()",
            expression=expression,
            model=model,
            primals=primals,
            wrt=wrt,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = self._request("POST", "jacobian", json_body=body, timeout=timeout)
        return self._parse_jacobian(response, kind)

    def hvp(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        output_index: int = 0,
        reduction: Reduction = "none",
        tangent_batch: bool = False,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> HVPResult:
        """``POST /hvp``: Hessian-vector products of a scalar-valued function.

        Args:
            expression, model, primals, dtype, device, encoding, timeout: as for :meth:`jvp`.
            tangents: the directions v, per input (same shape as its primal); H·v is
                taken with respect to the inputs that have one.
            parameter_tangents: models only: directions for parameters, by name.
            output_index: which output is the function (models with several outputs).
            reduction: how that output becomes a scalar: ``"sum"``, ``"mean"`` or
                ``"none"`` (the output must be a scalar already).
            tangent_batch: every tangent has a leading K; each H·v then has that leading K.
            options: more ``options`` fields, sent as they are.

        Returns:
            :class:`HVPResult`: ``output`` (the scalar) and ``hvp``, ``{name: H·v}``.
        """
        body, kind = self._hvp_body(
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            output_index=output_index,
            reduction=reduction,
            tangent_batch=tangent_batch,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = self._request("POST", "hvp", json_body=body, timeout=timeout)
        return self._parse_hvp(response, kind)

    def eval_shape(
        self,
        operation: str = "jvp",
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        wrt: str | Sequence[str] | None = None,
        output_index: int | None = None,
        reduction: Reduction | None = None,
        tangent_batch: bool = False,
        dtype: object = None,
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> EvalShapeResult:
        """``POST /eval_shape``: the shapes ``operation`` (jvp, jacobian, hvp, linearize)
        would answer, and its estimated FLOPs and peak bytes, computing nothing: size
        batches before sending them. A tensor may be a `ShapeInfo` (no data).

        Args:
            operation: ``"jvp"`` (default), ``"jacobian"``, ``"hvp"`` or ``"linearize"``.
            expression, model, primals, tangents, parameter_tangents, wrt, output_index,
                reduction, tangent_batch, dtype, device, options, timeout: as for that
                operation's method.

        Returns:
            :class:`EvalShapeResult`. Over a limit: the `PayloadTooLargeError` the
            operation would raise.
        """
        body = self._eval_shape_body(
            operation=operation,
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            wrt=wrt,
            output_index=output_index,
            reduction=reduction,
            tangent_batch=tangent_batch,
            dtype=dtype,
            device=device,
            options=options,
        )
        response = self._request("POST", "eval_shape", json_body=body, timeout=timeout)
        return self._parse_eval_shape(response, operation)

    def linearize(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        wrt: str | Sequence[str] | None = None,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> Linearization:
        """``POST /linearize``: linearize at ``primals`` once, then apply it to many tangents.

        The arguments are those of :meth:`jacobian`. Returns a :class:`Linearization`
        (``.id``, ``.output``, ``.expires_at``, ``.wrt``; ``.jvp(tangents=...)``;
        ``.close()``), a context manager that closes the session on exit. A session
        over the service's memory budget is a 503 (:class:`OverloadedError`, retried
        after its Retry-After as NOTE [retries] says).
        """
        body, kind = self._jacobian_body(
            where="linearize()",
            expression=expression,
            model=model,
            primals=primals,
            wrt=wrt,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = self._request("POST", "linearize", json_body=body, timeout=timeout)
        return Linearization(self, self._parse_linearize(response, kind), kind=kind)

    def vjp(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        cotangents: Any,
        wrt: str | Sequence[str] | None = None,
        cotangent_batch: bool = False,
        check: bool = False,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> VJPResult:
        """``POST /vjp``: Jᵀ·u by reverse mode at ``primals``.

        Args:
            expression, model, primals, dtype, device, encoding, timeout: as for :meth:`jvp`.
            cotangents: u, shaped like the output; for several outputs a tuple (or a list of
                arrays), one per output, None for an output without one.
            wrt: the input and parameter names to differentiate by; default all inputs.
            cotangent_batch: every cotangent has a leading K; every entry then has it too.
            check: also check against float64 finite differences and <u, J v> = <Jᵀu, v>.
            options: more ``options`` fields, sent as they are.

        Returns:
            :class:`VJPResult`: ``output`` and ``vjp``, ``{name: Jᵀu}``.

        Raises:
            ForwardADUnsupportedError: (501, type ``reverse_ad_unsupported``) an operator
                without a backward formula; the message names it.
        """
        body, kind = _vjp.vjp_body(
            self,
            expression=expression,
            model=model,
            primals=primals,
            cotangents=cotangents,
            wrt=wrt,
            cotangent_batch=cotangent_batch,
            check=check,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = self._request("POST", "vjp", json_body=body, timeout=timeout)
        return _vjp.parse_vjp(self, response, kind)

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

    def models(self) -> list[ModelInfo]:
        """``GET /models``: every registered model."""
        return self._parse_models(self._request("GET", "models"))

    def model(self, name: str) -> ModelInfo:
        """``GET /models/{name}``: one model's inputs, outputs, parameters and buffers."""
        return self._parse_model(self._request("GET", model_path(name)))

    def load_model(self, name: str) -> ModelInfo | None:
        """``POST /models/{name}/load`` (admin key): (re)read a model from the repository."""
        return self._parse_model_if_any(self._request("POST", f"{model_path(name)}/load"))

    def unload_model(self, name: str) -> None:
        """``DELETE /models/{name}`` (admin key): stop serving a model."""
        self._request("DELETE", model_path(name))

    def health(self) -> HealthStatus:
        """``GET /healthz`` and ``GET /readyz``: whether the service is up and can take work.

        A not-ready service (503 on /readyz) gives ``ready=False`` rather than an error;
        an unreachable one raises :class:`APIConnectionError`.
        """
        live = self._request("GET", "healthz")
        ready = self._request("GET", "readyz", max_retries=0, ok_statuses=frozenset({503}))
        return HealthStatus(
            live=True,
            ready=ready.is_success,
            detail={"healthz": _body_or_text(live), "readyz": _body_or_text(ready)},
        )

    def submit_job(
        self,
        tasks: Iterable[Mapping[str, Any]],
        *,
        expression: str | None = None,
        model: str | None = None,
        dtype: object = None,
        device: str | None = None,
        engine: str | None = None,
        fallback: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> Job:
        """``POST /jobs``: run many JVPs as one batch job.

        ``tasks`` are ``{"primals": ..., "tangents": ..., "parameter_tangents": ...}``
        mappings (with tensors as for :meth:`jvp`), each of which may override the
        job-wide ``expression``/``model`` and ``options``. One ``Idempotency-Key``
        (``idempotency_key``, or a new random one) is sent with every attempt, so a
        retried submission returns the same job.
        """
        body, kind = self._job_body(
            tasks,
            expression=expression,
            model=model,
            dtype=dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=encoding,
            options=options,
        )
        key = idempotency_key or _new_idempotency_key()
        response = self._request(
            "POST", "jobs", json_body=body, headers={"Idempotency-Key": key}, timeout=timeout
        )
        return Job(self, self._parse_job(response), kind=kind, idempotency_key=key)

    def get_job(self, job_id: str, *, as_torch: bool = False) -> Job:
        """``GET /jobs/{id}``: a handle on an existing job (``as_torch``: torch results)."""
        info = self._parse_job(self._request("GET", job_path(job_id)))
        return Job(self, info, kind=OutputKind(as_torch=as_torch))

    def list_jobs(self, *, offset: int = 0, limit: int = 20) -> list[JobInfo]:
        """``GET /jobs``: jobs, newest first, one page."""
        response = self._request("GET", "jobs", params={"offset": offset, "limit": limit})
        return self._parse_jobs(response)


class AsyncJVPClient(BaseClient):
    """The asyncio twin of :class:`JVPClient`: the same arguments, methods awaited.

    ``http_client`` is an ``httpx.AsyncClient`` (``httpx.ASGITransport`` serves an app
    in-process).
    """

    def __init__(
        self,
        *,
        base_url: str | httpx.URL | None = None,
        api_key: str | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        b64_min_elements: int = B64_MIN_ELEMENTS,
        binary_min_elements: int | None = BINARY_MIN_ELEMENTS,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            b64_min_elements=b64_min_elements,
            binary_min_elements=binary_min_elements,
        )
        if http_client is not None and not isinstance(http_client, httpx.AsyncClient):
            raise TypeError(
                f"http_client: expected an httpx.AsyncClient, got {type(http_client).__name__}"
            )
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else httpx.AsyncClient()

    async def close(self) -> None:
        """Close the underlying connection pool (unless it was passed in as ``http_client``)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncJVPClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _sleep(self, seconds: float) -> None:
        """Wait between retries and job polls (tests replace it to record the delays)."""
        await asyncio.sleep(seconds)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
        max_retries: int | None = None,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """Send one request, retrying as NOTE [retries] says; raise for error statuses."""
        request = self._client.build_request(
            **self._request_parts(
                method,
                path,
                json_body=json_body,
                content=content,
                params=params,
                headers=headers,
                timeout=timeout,
            )
        )
        retries = self.max_retries if max_retries is None else max_retries
        retries_taken = 0
        while True:
            try:
                response = await self._client.send(request)
            except httpx.TimeoutException as exc:
                if retries_taken < retries:
                    await self._sleep(self._retry_delay_s(retries_taken, None))
                    retries_taken += 1
                    continue
                raise APITimeoutError(request=request) from exc
            except httpx.TransportError as exc:
                if retries_taken < retries:
                    await self._sleep(self._retry_delay_s(retries_taken, None))
                    retries_taken += 1
                    continue
                raise APIConnectionError(f"Connection error: {exc}", request=request) from exc
            if response.is_success or response.status_code in ok_statuses:
                return response
            if retries_taken < retries and self._should_retry(response):
                delay = self._retry_delay_s(retries_taken, response)
                await response.aclose()
                await self._sleep(delay)
                retries_taken += 1
                continue
            raise make_status_error(response)

    async def jvp(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        dtype: object = None,
        device: str | None = None,
        engine: str | None = None,
        fallback: str | None = None,
        encoding: Encoding = "auto",
        tangent_batch: bool = False,
        check: bool = False,
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> JVPResult:
        """``POST /jvp``; see :meth:`JVPClient.jvp`."""
        request, kind = self._jvp_request(
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=encoding,
            options=options,
            tangent_batch=tangent_batch,
            check=check,
        )
        response = await self._request("POST", "jvp", **request, timeout=timeout)
        return self._parse_jvp(response, kind)

    async def jacobian(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        wrt: str | Sequence[str] | None = None,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> JacobianResult:
        """``POST /jacobian``; see :meth:`JVPClient.jacobian`."""
        body, kind = self._jacobian_body(
            where="jacobian()",
            expression=expression,
            model=model,
            primals=primals,
            wrt=wrt,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = await self._request("POST", "jacobian", json_body=body, timeout=timeout)
        return self._parse_jacobian(response, kind)

    async def hvp(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        output_index: int = 0,
        reduction: Reduction = "none",
        tangent_batch: bool = False,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> HVPResult:
        """``POST /hvp``; see :meth:`JVPClient.hvp`."""
        body, kind = self._hvp_body(
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            output_index=output_index,
            reduction=reduction,
            tangent_batch=tangent_batch,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = await self._request("POST", "hvp", json_body=body, timeout=timeout)
        return self._parse_hvp(response, kind)

    async def eval_shape(
        self,
        operation: str = "jvp",
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        wrt: str | Sequence[str] | None = None,
        output_index: int | None = None,
        reduction: Reduction | None = None,
        tangent_batch: bool = False,
        dtype: object = None,
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> EvalShapeResult:
        """``POST /eval_shape``: the shapes ``operation`` (jvp, jacobian, hvp, linearize)
        would answer, and its estimated FLOPs and peak bytes, computing nothing: size
        batches before sending them. A tensor may be a `ShapeInfo` (no data).

        Args:
            operation: ``"jvp"`` (default), ``"jacobian"``, ``"hvp"`` or ``"linearize"``.
            expression, model, primals, tangents, parameter_tangents, wrt, output_index,
                reduction, tangent_batch, dtype, device, options, timeout: as for that
                operation's method.

        Returns:
            :class:`EvalShapeResult`. Over a limit: the `PayloadTooLargeError` the
            operation would raise.
        """
        body = self._eval_shape_body(
            operation=operation,
            expression=expression,
            model=model,
            primals=primals,
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            wrt=wrt,
            output_index=output_index,
            reduction=reduction,
            tangent_batch=tangent_batch,
            dtype=dtype,
            device=device,
            options=options,
        )
        response = await self._request("POST", "eval_shape", json_body=body, timeout=timeout)
        return self._parse_eval_shape(response, operation)

    async def linearize(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        wrt: str | Sequence[str] | None = None,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> AsyncLinearization:
        """``POST /linearize``; see :meth:`JVPClient.linearize` (``async with`` closes it)."""
        body, kind = self._jacobian_body(
            where="linearize()",
            expression=expression,
            model=model,
            primals=primals,
            wrt=wrt,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = await self._request("POST", "linearize", json_body=body, timeout=timeout)
        return AsyncLinearization(self, self._parse_linearize(response, kind), kind=kind)

    async def vjp(
        self,
        *,
        expression: str | None = None,
        model: str | None = None,
        primals: _Tensors,
        cotangents: Any,
        wrt: str | Sequence[str] | None = None,
        cotangent_batch: bool = False,
        check: bool = False,
        dtype: object = None,
        device: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> VJPResult:
        """``POST /vjp``; see :meth:`JVPClient.vjp`."""
        body, kind = _vjp.vjp_body(
            self,
            expression=expression,
            model=model,
            primals=primals,
            cotangents=cotangents,
            wrt=wrt,
            cotangent_batch=cotangent_batch,
            check=check,
            dtype=dtype,
            device=device,
            encoding=encoding,
            options=options,
        )
        response = await self._request("POST", "vjp", json_body=body, timeout=timeout)
        return _vjp.parse_vjp(self, response, kind)

    async def models(self) -> list[ModelInfo]:
        """``GET /models``: every registered model."""
        return self._parse_models(await self._request("GET", "models"))

    async def model(self, name: str) -> ModelInfo:
        """``GET /models/{name}``: one model's inputs, outputs, parameters and buffers."""
        return self._parse_model(await self._request("GET", model_path(name)))

    async def load_model(self, name: str) -> ModelInfo | None:
        """``POST /models/{name}/load`` (admin key): (re)read a model from the repository."""
        return self._parse_model_if_any(await self._request("POST", f"{model_path(name)}/load"))

    async def unload_model(self, name: str) -> None:
        """``DELETE /models/{name}`` (admin key): stop serving a model."""
        await self._request("DELETE", model_path(name))

    async def health(self) -> HealthStatus:
        """``GET /healthz`` and ``GET /readyz``; see :meth:`JVPClient.health`."""
        live = await self._request("GET", "healthz")
        ready = await self._request("GET", "readyz", max_retries=0, ok_statuses=frozenset({503}))
        return HealthStatus(
            live=True,
            ready=ready.is_success,
            detail={"healthz": _body_or_text(live), "readyz": _body_or_text(ready)},
        )

    async def submit_job(
        self,
        tasks: Iterable[Mapping[str, Any]],
        *,
        expression: str | None = None,
        model: str | None = None,
        dtype: object = None,
        device: str | None = None,
        engine: str | None = None,
        fallback: str | None = None,
        encoding: Encoding = "auto",
        options: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> AsyncJob:
        """``POST /jobs``; see :meth:`JVPClient.submit_job`."""
        body, kind = self._job_body(
            tasks,
            expression=expression,
            model=model,
            dtype=dtype,
            device=device,
            engine=engine,
            fallback=fallback,
            encoding=encoding,
            options=options,
        )
        key = idempotency_key or _new_idempotency_key()
        response = await self._request(
            "POST", "jobs", json_body=body, headers={"Idempotency-Key": key}, timeout=timeout
        )
        return AsyncJob(self, self._parse_job(response), kind=kind, idempotency_key=key)

    async def get_job(self, job_id: str, *, as_torch: bool = False) -> AsyncJob:
        """``GET /jobs/{id}``: a handle on an existing job."""
        info = self._parse_job(await self._request("GET", job_path(job_id)))
        return AsyncJob(self, info, kind=OutputKind(as_torch=as_torch))

    async def list_jobs(self, *, offset: int = 0, limit: int = 20) -> list[JobInfo]:
        """``GET /jobs``: jobs, newest first, one page."""
        response = await self._request("GET", "jobs", params={"offset": offset, "limit": limit})
        return self._parse_jobs(response)


def _body_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
