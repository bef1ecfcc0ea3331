"""Reverse mode: ``POST /vjp`` and ``POST /linearize/{id}/vjp`` (Jᵀ·u).

The body builders and parsers live here, apart from ``_base.py``; `JVPClient.vjp`,
`AsyncJVPClient.vjp` and `Linearization.vjp` are thin methods over them.

    >>> from jvp_client import JVPClient
    >>> with JVPClient() as client:  # doctest: +SKIP
    ...     r = client.vjp(expression="sin(x) * y", primals={"x": x, "y": y}, cotangents=u)
    ...     r.vjp["x"]  # cos(x) * y * u
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from ._base import Encoding, OutputKind, _check_encoding, _decode_map, _names, _timing
from ._base import _response_encoding as response_encoding
from ._exceptions import APIResponseValidationError
from ._tensors import Array, decode_tensors, encode_tensor, is_torch_tensor

if TYPE_CHECKING:
    from ._base import BaseClient

__all__ = ["VJPResult", "parse_linearized_vjp", "parse_vjp", "vjp_body"]

Cotangents = Any  # one tensor, or a list (one per output, None for an output without one)


@dataclass(frozen=True)
class VJPResult:
    """The answer of ``POST /vjp``.

    ``vjp`` maps each name of ``wrt`` (default: every input) to Jᵀ·u, shaped like that
    input or parameter (with a leading K under ``cotangent_batch``). ``check`` is the raw
    ``check`` object with ``check=True`` (``passed``, ``max_rel_error``, ``identity``...).
    """

    output: Array | list[Array]
    vjp: dict[str, Array]
    dtype: str
    device: str
    method: str
    timing_ms: dict[str, float]
    check: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _encode_cotangents(
    client: BaseClient, cotangents: Cotangents, dtype: str | None, where: str
) -> tuple[Any, bool, bool]:
    """``(wire, any b64, any torch)``: a list stays a list (None entries as null)."""

    def one(value: Any) -> tuple[Any, bool]:
        if value is None:
            return None, False
        try:
            return encode_tensor(value, dtype=dtype, b64_min_elements=client.b64_min_elements)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: cotangents: {exc}") from exc

    if isinstance(cotangents, tuple) or (
        isinstance(cotangents, list) and any(c is None or hasattr(c, "shape") for c in cotangents)
    ):
        # A list of tensors (one per output). A plain nested list of numbers is one tensor.
        encoded = [one(c) for c in cotangents]
        wires = [w for w, _ in encoded]
        return (
            wires,
            any(u for _, u in encoded),
            any(is_torch_tensor(c) for c in cotangents if c is not None),
        )
    wire, used = one(cotangents)
    return wire, used, is_torch_tensor(cotangents)


def vjp_body(
    client: BaseClient,
    *,
    expression: str | None,
    model: str | None,
    primals: Mapping[str, object],
    cotangents: Cotangents,
    wrt: str | Sequence[str] | None,
    cotangent_batch: bool,
    check: bool,
    dtype: object,
    device: str | None,
    encoding: Encoding,
    options: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], OutputKind]:
    """The ``POST /vjp`` body and how to return its tensors."""
    where = "vjp()"
    body, wire_dtype, wire_encoding, kind = client._point_body(
        where=where,
        expression=expression,
        model=model,
        primals=primals,
        dtype=dtype,
        encoding=encoding,
    )
    wire, used_b64, torch_in = _encode_cotangents(client, cotangents, wire_dtype, where)
    body["cotangents"] = wire
    if wrt is not None:
        body["wrt"] = _names(wrt, where)
    opts = client._options(
        dtype=wire_dtype,
        device=device,
        engine=None,
        fallback=None,
        encoding=response_encoding(encoding, used_b64) or wire_encoding,
        extra=options,
    )
    if cotangent_batch:
        opts["cotangent_batch"] = True
    if check:
        opts["check"] = True
    if opts:
        body["options"] = opts
    if torch_in and not kind.as_torch:
        kind = OutputKind(as_torch=True)
    return body, kind


def parse_vjp(client: BaseClient, response: httpx.Response, kind: OutputKind) -> VJPResult:
    body = client._json(response)
    try:
        return VJPResult(
            output=decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device),
            vjp=_decode_map(body["vjp"], kind),
            dtype=str(body.get("dtype", "")),
            device=str(body.get("device", "")),
            method=str(body.get("method", "")),
            timing_ms=_timing(body),
            check=body.get("check"),
            raw=body,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise APIResponseValidationError(
            f"Unexpected /vjp response: {exc}", response=response, body=body
        ) from exc


def linearized_vjp_body(
    client: BaseClient,
    *,
    cotangents: Cotangents,
    dtype: str | None,
    cotangent_batch: bool,
    encoding: Encoding,
) -> tuple[dict[str, Any], OutputKind | None]:
    """The ``POST /linearize/{id}/vjp`` body (None kind: the session's applies)."""
    where = "Linearization.vjp()"
    _check_encoding(encoding, where)
    wire, used_b64, torch_in = _encode_cotangents(client, cotangents, dtype, where)
    body: dict[str, Any] = {"cotangents": wire}
    opts: dict[str, Any] = {}
    if cotangent_batch:
        opts["cotangent_batch"] = True
    wire_encoding = response_encoding(encoding, used_b64)
    if wire_encoding is not None:
        opts["encoding"] = wire_encoding
    if opts:
        body["options"] = opts
    return body, OutputKind(as_torch=True) if torch_in else None


def parse_linearized_vjp(
    client: BaseClient, response: httpx.Response, kind: OutputKind
) -> dict[str, Array]:
    body = client._json(response)
    try:
        return _decode_map(body["vjp"], kind)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise APIResponseValidationError(
            f"Unexpected /linearize/{{id}}/vjp response: {exc}", response=response, body=body
        ) from exc
