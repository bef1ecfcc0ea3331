"""Reverse mode: ``POST /vjp`` (Jᵀ·u) as an operation plan, and what ``POST
/linearize/{id}/vjp`` shares with it (the cotangents' wire form, the ``vjp`` reader).

The plan :func:`vjp` is bound as ``JVPClient.vjp`` / ``AsyncJVPClient.vjp`` (NOTE
[adding an operation] in ``_operations.py``); ``Linearization.vjp`` is a plan in
``_linearize.py`` over :func:`encode_cotangents` and :func:`read_vjp_map`.

    >>> from jvp_client import JVPClient
    >>> with JVPClient() as client:  # doctest: +SKIP
    ...     out, vjp = client.vjp(expression="sin(x) * y", primals={"x": x, "y": y}, cotangents=u)
    ...     vjp["x"]  # cos(x) * y * u
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _parsing as parsing
from ._base import NOT_GIVEN, Encoding, Limits, OutputKind, TimeoutTypes
from ._bodies import names, plan_request
from ._plans import Plan
from ._tensors import Array, decode_tensors, encode_tensor, infer_dtype, normalize_dtype
from ._types import Computed

__all__ = ["VJPResult", "encode_cotangents", "read_vjp", "read_vjp_map", "vjp"]

Cotangents = Any  # one tensor, or a tuple/list (one per output, None for an output without one)


@dataclass(frozen=True, repr=False)
class VJPResult(Computed):
    """The answer of ``POST /vjp``.

    ``vjp`` maps each name of ``wrt`` (default: every input) to Jᵀ·u, shaped like that
    input or parameter (with a leading K under ``cotangent_batch``). ``check`` is the raw
    ``check`` object with ``check=True`` (``passed``, ``max_rel_error``, ``identity``...).
    It unpacks as ``jax.vjp``'s primal output and gradients do: ``out, vjp = client.vjp(...)``.
    """

    output: Array | list[Array]
    vjp: dict[str, Array]
    method: str
    check: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        """``out, vjp = client.vjp(...)``: the output and ``{name: Jᵀu}``."""
        return iter((self.output, self.vjp))


def _is_several(cotangents: Cotangents) -> bool:
    """A tuple, or a list holding None or arrays, is one cotangent per output; a plain
    nested list of numbers is one tensor."""
    if isinstance(cotangents, tuple):
        return True
    return isinstance(cotangents, list) and any(
        c is None or hasattr(c, "shape") for c in cotangents
    )


def encode_cotangents(
    client: Limits, cotangents: Cotangents, dtype: str | None, where: str
) -> tuple[Any, bool, dict[str, object]]:
    """``(wire, any b64, {index: given tensor})``: a list stays a list (None as null);
    the map of given tensors tells :meth:`OutputKind.of` whether torch went in."""
    given = list(cotangents) if _is_several(cotangents) else [cotangents]
    wires: list[Any] = []
    any_b64 = False
    for value in given:
        if value is None:
            wires.append(None)
            continue
        try:
            wire, used = encode_tensor(value, dtype=dtype, b64_min_elements=client.b64_min_elements)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: cotangents: {exc}") from exc
        wires.append(wire)
        any_b64 = any_b64 or used
    tensors = {str(i): c for i, c in enumerate(given) if c is not None}
    return (wires if _is_several(cotangents) else wires[0]), any_b64, tensors


def read_vjp_map(kind: OutputKind) -> Callable[[Any], dict[str, Array]]:
    """The ``vjp`` field, ``{name: Jᵀu}`` (``POST /linearize/{id}/vjp``)."""
    return lambda body: parsing._decode_map(body["vjp"], kind)


def read_vjp(kind: OutputKind) -> Callable[[Any], VJPResult]:
    def read(body: Any) -> VJPResult:
        return VJPResult(
            output=decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device),
            vjp=parsing._decode_map(body["vjp"], kind),
            method=str(body.get("method", "")),
            check=body.get("check"),
            **parsing._facts(body),
        )

    return read


def vjp(
    client: Limits,
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Mapping[str, Any],
    cotangents: Cotangents,
    wrt: str | Sequence[str] | None = None,
    cotangent_batch: bool = False,
    check: bool = False,
    dtype: object = None,
    device: str | None = None,
    encoding: Encoding = "auto",
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[VJPResult]:
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
        :class:`VJPResult`: ``output`` and ``vjp``, ``{name: Jᵀu}`` (torch tensors when
        torch primals or cotangents went in), ``check``, ``request_id``; it unpacks as
        ``out, vjp = client.vjp(...)``.

    Raises:
        ReverseADUnsupportedError: (501, type ``reverse_ad_unsupported``) an operator
            without a backward formula; the message names it.
    """
    where = "vjp()"
    wire_dtype = normalize_dtype(dtype)
    if wire_dtype is None and isinstance(primals, Mapping):
        wire_dtype = infer_dtype(primals.values())  # as request() infers it
    wire, used_b64, given = encode_cotangents(client, cotangents, wire_dtype, where)
    fields = {"cotangents": wire, "wrt": names(wrt, where)}
    call, kind = plan_request(
        client,
        where,
        "vjp",
        locals(),
        fields=fields,
        options={
            "cotangent_batch": cotangent_batch,
            "check": check,
            # b64 answers when b64 cotangents went out (NOTE [wire form choice])
            "encoding": "b64" if encoding == "auto" and used_b64 else None,
        },
    )
    response = yield call
    return parsing.parse(response, "/vjp", read_vjp(OutputKind.of(primals, given)))
