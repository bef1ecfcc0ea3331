"""Linearize once, apply many times: a handle on one session of ``POST /linearize``.

The service keeps the function linearized at the primals until the session
expires (``expires_at``) or is closed; each :meth:`Linearization.jvp` is then
``POST /linearize/{id}/jvp`` and :meth:`Linearization.close` is
``DELETE /linearize/{id}``. A handle is a context manager that closes its
session on exit::

    with client.linearize(expression="sin(x) * y", primals={"x": x, "y": y}) as lin:
        for v in directions:
            lin.jvp(tangents={"x": v})
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _vjp
from ._base import NOT_GIVEN, Encoding, OutputKind, TimeoutTypes, linearization_path
from ._exceptions import NotFoundError
from ._tensors import Array
from ._types import LinearizationInfo

if TYPE_CHECKING:
    from ._client import AsyncJVPClient, JVPClient

__all__ = ["AsyncLinearization", "Linearization"]

_Tensors = Mapping[str, Any]


class _LinearizationBase:
    """What the sync and async handles share: the session's facts."""

    def __init__(self, info: LinearizationInfo, *, kind: OutputKind | None = None) -> None:
        self.info = info
        self._kind = kind or OutputKind()
        self._closed = False

    @property
    def id(self) -> str:
        """The session id."""
        return self.info.id

    @property
    def output(self) -> Array | list[Array]:
        """f(primals): an array, or a list of arrays for several outputs."""
        return self.info.output

    @property
    def expires_at(self) -> str:
        """When the service drops the session (ISO 8601, UTC)."""
        return self.info.expires_at

    @property
    def wrt(self) -> list[str]:
        """The input and parameter names the tangents of :meth:`jvp` may use."""
        return self.info.wrt

    @property
    def dtype(self) -> str:
        """The computation dtype; tangents given as Python numbers or lists take it."""
        return self.info.dtype

    @property
    def device(self) -> str:
        return self.info.device

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (the session may also have expired on the service)."""
        return self._closed

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"{type(self).__name__}(id={self.id!r}, wrt={self.wrt!r}, "
            f"expires_at={self.expires_at!r}{state})"
        )

    def _kind_for(self, kind: OutputKind | None) -> OutputKind:
        """torch out when torch tangents went in, else as the session's primals were."""
        return kind if kind is not None else self._kind


class Linearization(_LinearizationBase):
    """A linearize session of :meth:`JVPClient.linearize`; closes its session on ``with`` exit."""

    def __init__(
        self, client: JVPClient, info: LinearizationInfo, *, kind: OutputKind | None = None
    ) -> None:
        super().__init__(info, kind=kind)
        self._client = client

    def jvp(
        self,
        *,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        tangent_batch: bool = False,
        encoding: Encoding = "auto",
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> Array | list[Array]:
        """``POST /linearize/{id}/jvp``: J·t at the session's point.

        Args:
            tangents: per input of :attr:`wrt`, shaped like its primal; missing ones are zero.
            parameter_tangents: per parameter of :attr:`wrt`.
            tangent_batch: every tangent has a leading K; the answer then has that leading K.
            encoding: ``"auto"`` (base64 answers when base64 went out), ``"json"``, ``"b64"``.
            timeout: this request's timeout, instead of the client's.

        Returns:
            J·t: an array, or a list of arrays for several outputs (torch tensors when
            torch tangents went in or the session was made from torch primals).

        Raises:
            NotFoundError: the session expired or was closed.
        """
        body, kind = self._client._linearized_jvp_body(
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=self.dtype or None,
            tangent_batch=tangent_batch,
            encoding=encoding,
        )
        response = self._client._request(
            "POST", f"{linearization_path(self.id)}/jvp", json_body=body, timeout=timeout
        )
        return self._client._parse_linearized_jvp(response, self._kind_for(kind))

    def vjp(
        self,
        *,
        cotangents: Any,
        cotangent_batch: bool = False,
        encoding: Encoding = "auto",
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> dict[str, Array]:
        """``POST /linearize/{id}/vjp``: Jᵀ·u at the session's point, ``{name: array}`` per
        name of :attr:`wrt`; the session must be made with ``options={"transpose": True}``.
        ``cotangents`` as for :meth:`JVPClient.vjp`."""
        body, kind = _vjp.linearized_vjp_body(
            self._client,
            cotangents=cotangents,
            dtype=self.dtype or None,
            cotangent_batch=cotangent_batch,
            encoding=encoding,
        )
        response = self._client._request(
            "POST", f"{linearization_path(self.id)}/vjp", json_body=body, timeout=timeout
        )
        return _vjp.parse_linearized_vjp(self._client, response, self._kind_for(kind))

    def close(self) -> None:
        """``DELETE /linearize/{id}``: free the session now. A session already gone is fine."""
        if self._closed:
            return
        try:
            self._client._request("DELETE", linearization_path(self.id))
        except NotFoundError:
            pass  # it expired: gone either way
        self._closed = True

    def __enter__(self) -> Linearization:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncLinearization(_LinearizationBase):
    """The async twin of :class:`Linearization`: ``await lin.jvp(...)``, ``async with``."""

    def __init__(
        self, client: AsyncJVPClient, info: LinearizationInfo, *, kind: OutputKind | None = None
    ) -> None:
        super().__init__(info, kind=kind)
        self._client = client

    async def jvp(
        self,
        *,
        tangents: _Tensors | None = None,
        parameter_tangents: _Tensors | None = None,
        tangent_batch: bool = False,
        encoding: Encoding = "auto",
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> Array | list[Array]:
        """``POST /linearize/{id}/jvp``; see :meth:`Linearization.jvp`."""
        body, kind = self._client._linearized_jvp_body(
            tangents=tangents,
            parameter_tangents=parameter_tangents,
            dtype=self.dtype or None,
            tangent_batch=tangent_batch,
            encoding=encoding,
        )
        response = await self._client._request(
            "POST", f"{linearization_path(self.id)}/jvp", json_body=body, timeout=timeout
        )
        return self._client._parse_linearized_jvp(response, self._kind_for(kind))

    async def vjp(
        self,
        *,
        cotangents: Any,
        cotangent_batch: bool = False,
        encoding: Encoding = "auto",
        timeout: TimeoutTypes = NOT_GIVEN,
    ) -> dict[str, Array]:
        """``POST /linearize/{id}/vjp``; see :meth:`Linearization.vjp`."""
        body, kind = _vjp.linearized_vjp_body(
            self._client,
            cotangents=cotangents,
            dtype=self.dtype or None,
            cotangent_batch=cotangent_batch,
            encoding=encoding,
        )
        response = await self._client._request(
            "POST", f"{linearization_path(self.id)}/vjp", json_body=body, timeout=timeout
        )
        return _vjp.parse_linearized_vjp(self._client, response, self._kind_for(kind))

    async def close(self) -> None:
        """``DELETE /linearize/{id}``; see :meth:`Linearization.close`."""
        if self._closed:
            return
        try:
            await self._client._request("DELETE", linearization_path(self.id))
        except NotFoundError:
            pass
        self._closed = True

    async def __aenter__(self) -> AsyncLinearization:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
