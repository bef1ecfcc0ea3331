"""Linearize once, apply many times: a handle on one session of ``POST /linearize``.

The service keeps the function linearized at the primals until the session
expires (``expires_at``) or is closed; each :meth:`Linearization.jvp` is then
``POST /linearize/{id}/jvp`` and :meth:`Linearization.close` is
``DELETE /linearize/{id}``; a session made with ``options={"transpose": True}``
also answers :meth:`Linearization.vjp` (``POST /linearize/{id}/vjp``). A handle is
a context manager that closes its session on exit::

    with client.linearize(expression="sin(x) * y", primals={"x": x, "y": y}) as lin:
        for v in directions:
            lin.jvp(tangents={"x": v})   # or lin({"x": v}); lin(v) when wrt is one name

A handle is callable as the function ``jax.linearize`` returns is: ``lin(v)``.
Its methods are plans (NOTE [plans] in ``_plans.py``) written once for both handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from . import _parsing as parsing
from ._base import NOT_GIVEN, Encoding, OutputKind, TimeoutTypes, linearization_path
from ._bodies import request
from ._exceptions import NotFoundError
from ._plans import (
    AsyncClosesOnExit,
    AsyncRunner,
    Call,
    ClosesOnExit,
    Handle,
    Plan,
    SyncRunner,
    async_method,
    sync_method,
)
from ._tensors import Array
from ._types import LinearizationInfo
from ._vjp import encode_cotangents, read_vjp_map

__all__ = ["AsyncLinearization", "Linearization"]

_Tensors = Mapping[str, Any]
C = TypeVar("C")


class _LinearizationBase(Handle[C, LinearizationInfo]):
    """What the sync and async handles share: the session's facts."""

    def __init__(
        self, client: C, info: LinearizationInfo, *, kind: OutputKind | None = None
    ) -> None:
        super().__init__(client, info, kind)
        self._closed = False

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


def jvp(
    lin: _LinearizationBase[Any],
    *,
    tangents: _Tensors | None = None,
    parameter_tangents: _Tensors | None = None,
    tangent_batch: bool = False,
    encoding: Encoding = "auto",
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[Array | list[Array]]:
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
    call, kind, _ = request(
        lin._client,
        "Linearization.jvp()",
        f"{linearization_path(lin.id)}/jvp",
        target=None,
        tensors={"tangents": tangents, "parameter_tangents": parameter_tangents},
        dtype=lin.dtype or None,
        encoding=encoding,
        options={"tangent_batch": tangent_batch},
        timeout=timeout,
    )
    response = yield call
    # torch out when torch tangents went in, else as the session's primals were
    kind = kind if kind.as_torch else lin._kind
    return parsing.parse(response, "/linearize/{id}/jvp", parsing.read_tensors("jvp", kind))


def apply(
    lin: _LinearizationBase[Any],
    tangents: _Tensors | Any,
    /,
    *,
    tangent_batch: bool = False,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[Array | list[Array]]:
    """``lin(v)``: J·v, as the function ``jax.linearize`` returns applies it.

    ``tangents`` is ``{name: tangent}`` (names of :attr:`wrt`), or one tensor when the
    session was made for one name (``wrt``). Parameters' tangents go by name to
    :meth:`jvp` (``parameter_tangents=``).
    """
    if not isinstance(tangents, Mapping):
        if len(lin.wrt) != 1:
            raise TypeError(
                f"Linearization(v): pass {{name: tangent}} for a session of several names "
                f"(wrt={lin.wrt!r}), or linearize with one name in wrt="
            )
        tangents = {lin.wrt[0]: tangents}
    return (yield from jvp(lin, tangents=tangents, tangent_batch=tangent_batch, timeout=timeout))


def vjp(
    lin: _LinearizationBase[Any],
    *,
    cotangents: Any,
    cotangent_batch: bool = False,
    encoding: Encoding = "auto",
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[dict[str, Array]]:
    """``POST /linearize/{id}/vjp``: Jᵀ·u at the session's point, ``{name: array}`` per
    name of :attr:`wrt`; the session must be made with ``options={"transpose": True}``.
    ``cotangents`` as for :meth:`JVPClient.vjp`; ``cotangent_batch``: a leading K."""
    where = "Linearization.vjp()"
    wire, used_b64, given = encode_cotangents(lin._client, cotangents, lin.dtype or None, where)
    call, _, _ = request(
        lin._client,
        where,
        f"{linearization_path(lin.id)}/vjp",
        target=None,
        tensors={},
        dtype=lin.dtype or None,
        encoding=encoding,
        fields={"cotangents": wire},
        options={
            "cotangent_batch": cotangent_batch,
            "encoding": "b64" if encoding == "auto" and used_b64 else None,
        },
        timeout=timeout,
    )
    response = yield call
    # torch out when torch cotangents went in, else as the session's primals were
    kind = OutputKind.of(given)
    kind = kind if kind.as_torch else lin._kind
    return parsing.parse(response, "/linearize/{id}/vjp", read_vjp_map(kind))


def close(lin: _LinearizationBase[Any]) -> Plan[None]:
    """``DELETE /linearize/{id}``: free the session now. A session already gone is fine."""
    if lin._closed:
        return
    try:
        yield Call("DELETE", linearization_path(lin.id))
    except NotFoundError:
        pass  # it expired: gone either way
    lin._closed = True


class Linearization(ClosesOnExit, _LinearizationBase[SyncRunner]):
    """A linearize session of :meth:`JVPClient.linearize`; closes its session on ``with`` exit."""

    jvp = sync_method(jvp)
    vjp = sync_method(vjp)
    __call__ = sync_method(apply)
    close = sync_method(close)


class AsyncLinearization(AsyncClosesOnExit, _LinearizationBase[AsyncRunner]):
    """The async twin of :class:`Linearization`: ``await lin.jvp(...)``, ``await lin(v)``,
    ``async with``."""

    jvp = async_method(jvp)
    vjp = async_method(vjp)
    __call__ = async_method(apply)
    close = async_method(close)
