"""``POST /solve`` as an operation plan: Newton-Krylov, linear and least-squares solves run
on the server, every J·v an exact JVP there, one request per solve.

The plan :func:`solve` is bound as ``JVPClient.solve`` / ``AsyncJVPClient.solve`` (NOTE
[adding an operation] in ``_operations.py``).

    >>> from jvp_client import JVPClient
    >>> with JVPClient() as client:  # doctest: +SKIP
    ...     r = client.solve(expression="u**3 - a", primals={"u": u0, "a": a}, unknowns="u")
    ...     r.solution["u"], r.converged, r.residual_norm
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _parsing as parsing
from ._base import NOT_GIVEN, Encoding, Limits, OutputKind, TimeoutTypes
from ._bodies import request
from ._plans import Plan
from ._tensors import Array, decode_tensors, encode_tensor, infer_dtype, normalize_dtype

__all__ = ["SolveResult", "solve"]

Method = Literal["newton_krylov", "linear", "least_squares"]


@dataclass(frozen=True)
class SolveResult:
    """The answer of ``POST /solve``.

    ``solution`` maps each unknown to its value (for ``method="linear"``: δ of J δ = rhs);
    ``output`` is f there. ``converged`` is False, never an error, when the caps were
    reached or a NaN stopped the solve (``reason`` says which); ``history`` has one
    ``{"iteration", "residual_norm", "krylov_iterations", "step"}`` per iteration.
    """

    solution: dict[str, Array]
    output: Array | list[Array]
    residual_norm: float
    converged: bool
    iterations: int
    jvp_count: int
    vjp_count: int
    history: list[dict[str, Any]]
    dtype: str
    device: str
    timing_ms: dict[str, float]
    reason: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    #: The ``X-Request-ID`` of the response (quote it when reporting a problem).
    request_id: str | None = None


def _float(value: Any) -> float:
    """A JSON number, or the strings the service writes for NaN and infinities."""
    return float(value)  # float("NaN"), float("Infinity") parse


def read_solve(kind: OutputKind) -> Callable[[Any], SolveResult]:
    def read(body: Any) -> SolveResult:
        return SolveResult(
            solution=parsing._decode_map(body["solution"], kind),
            output=decode_tensors(body["output"], as_torch=kind.as_torch, device=kind.device),
            residual_norm=_float(body["residual_norm"]),
            converged=bool(body["converged"]),
            iterations=int(body["iterations"]),
            jvp_count=int(body["jvp_count"]),
            vjp_count=int(body["vjp_count"]),
            history=list(body["history"]),
            reason=body.get("reason"),
            **parsing._facts(body),
        )

    return read


def _unknowns(unknowns: str | Sequence[str], where: str) -> list[str]:
    listed = [unknowns] if isinstance(unknowns, str) else list(unknowns)
    if not listed or not all(isinstance(n, str) and n for n in listed):
        raise ValueError(f"{where}: expected unknowns to be input names, got {unknowns!r}")
    return listed


def _rhs(client: Limits, rhs: Any, dtype: str | None, where: str) -> tuple[Any, bool]:
    """The wire form of ``rhs``: one tensor, or a tuple/list of arrays (one per output)."""
    if rhs is None:
        return None, False
    several = isinstance(rhs, tuple) or (
        isinstance(rhs, list) and any(hasattr(r, "shape") for r in rhs)
    )
    wires, any_b64 = [], False
    for value in list(rhs) if several else [rhs]:
        try:
            wire, used = encode_tensor(value, dtype=dtype, b64_min_elements=client.b64_min_elements)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: rhs: {exc}") from exc
        wires.append(wire)
        any_b64 = any_b64 or used
    return (wires if several else wires[0]), any_b64


# Over 60 lines with its docstring, which is what help() and IDEs show for both clients'
# solve (NOTE [adding an operation]); the code itself is one request.
def solve(
    client: Limits,
    *,
    expression: str | None = None,
    model: str | None = None,
    primals: Mapping[str, Any],
    unknowns: str | Sequence[str],
    method: Method = "newton_krylov",
    rhs: Any = None,
    tol: float | None = None,
    max_iterations: int | None = None,
    krylov: Literal["gmres", "bicgstab", "cg"] | None = None,
    krylov_tol: float | Literal["auto"] | None = None,
    max_krylov: int | None = None,
    line_search: bool | None = None,
    dtype: object = None,
    device: str | None = None,
    encoding: Encoding = "auto",
    options: Mapping[str, Any] | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[SolveResult]:
    """``POST /solve``: solve on the server, with exact JVPs (and VJPs) there.

    Args:
        expression, model, primals, device, encoding, timeout: as for :meth:`jvp`; the
            primals of the unknowns are the initial guess, the others stay fixed.
        unknowns: the input name(s) to solve for.
        method: ``"newton_krylov"`` (f = 0), ``"linear"`` (J δ = rhs at the primals) or
            ``"least_squares"`` (min ||f||², Gauss-Newton / Levenberg-Marquardt with LSMR).
        rhs: for ``"linear"``: shaped like f's output (a tuple, one per output, for several).
        tol, max_iterations, krylov, krylov_tol, max_krylov, line_search: the solve's
            options (None: the service's defaults: 1e-8, 50, gmres, "auto", 200, True).
        dtype: the computation dtype; default the one the floating primals share (send
            float64 primals, or ``dtype="float64"``, for a tolerance of 1e-8).
        options: more ``options`` fields, sent as they are (``restart``, ...).

    Returns:
        :class:`SolveResult`: ``solution`` ({unknown: value}, torch tensors when torch
        primals went in), ``converged``, ``residual_norm``, ``iterations``,
        ``jvp_count``, ``vjp_count``, ``history``, ``reason``.

    Raises:
        APIStatusError: 422 for unknowns that are no input, or a non-square system
            (newton_krylov, linear); 413 or 504 for a solve whose caps pass a limit
            (submit it as a job with ``"operation": "solve"``).
    """
    where = "solve()"
    wire_dtype = normalize_dtype(dtype)
    if wire_dtype is None and isinstance(primals, Mapping):
        wire_dtype = infer_dtype(primals.values())
    rhs_wire, used_b64 = _rhs(client, rhs, wire_dtype, where)
    call, kind, _ = request(
        client,
        where,
        "solve",
        target=(expression, model),
        tensors={"primals": primals},
        dtype=dtype,
        encoding=encoding,
        fields={"unknowns": _unknowns(unknowns, where), "method": method, "rhs": rhs_wire},
        options={
            "dtype": True,
            "device": device,
            "tol": tol,
            "max_iterations": max_iterations,
            "krylov": krylov,
            "krylov_tol": krylov_tol,
            "max_krylov": max_krylov,
            "line_search": line_search,
            "encoding": "b64" if encoding == "auto" and used_b64 else None,
        },
        extra_options=options,
        timeout=timeout,
    )
    response = yield call
    return parsing.parse(response, "/solve", read_solve(OutputKind.of(primals)))
