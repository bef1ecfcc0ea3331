"""options.check: the answer under test against float64 central differences, one step per
argument matched to its scale (NOTE [finite-difference check]): J·v for /jvp, and for /vjp
<Jᵀu, v> against <u, FD(J v)> together with the dot-product identity (NOTE [VJP check]).

The check is apart from the computation: an operation computes in the request's dtype,
then hands its answer here with the target to rematerialize in float64.

    >>> import torch
    >>> from app.engine.protocol import Arguments
    >>> from app.engine.target import Materialized
    >>> m = Materialized(fn=lambda a, s: (a[0] ** 3,), parameters={}, buffers={})
    >>> x = torch.tensor([2.0], dtype=torch.float64)
    >>> fd, eps = central_difference(Arguments(m, (x,), (torch.ones(1, dtype=torch.float64),), {}))
    >>> round(fd[0].item(), 6)  # 3 x^2
    12.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from app.engine.devices import api_float
from app.engine.errors import ForwardADUnsupported
from app.engine.fallback import jvp_with_fallback
from app.engine.jvp import ENGINES
from app.engine.protocol import Arguments, OptionalTensors, Tensors, partial_function
from app.engine.target import Materialized, Target

# NOTE [finite-difference check]
# options.check estimates J·v by central differences in float64, one input at a
# time, each with a step matched to that input's scale:
#     h_a = cbrt(eps_64) * max(1, |a|_inf) / |v_a|_inf
#     J·v ~= sum_a (f(.., a + h_a v_a, ..) - f(.., a - h_a v_a, ..)) / (2 h_a)
# (cbrt(eps) balances the O(h^2) truncation error of central differences against
# the O(eps/h) rounding error.) The JVP under test is the one computed in the
# request's dtype. passed means, over all outputs (and all K directions),
#     max|jvp - fd| <= atol + rtol * max(|fd|_inf, |jvp|_inf)
# with (rtol, atol) from CHECK_TOLERANCES for the computation dtype.
# max_rel_error is max|jvp - fd| / max(|fd|_inf, |jvp|_inf) (0 when both are 0).
# eps is the largest perturbation of any input element, max_a h_a |v_a|_inf.
# The errors are taken over the elements where both are finite: Python's
# max(0.0, nan) is 0.0, so a NaN must never reach them. An element that is NaN or
# infinite on one side only fails the check, and "nonfinite" says which side:
# "jvp" (a NaN or infinite JVP where the estimate is finite), "estimate" (the
# other way: a difference quotient that overflowed or left the function's
# domain), "both" (each somewhere), null when there is none. Where both sides are
# non-finite the estimate cannot judge the JVP, and neither is a number a caller
# could take for a true one: those elements count in neither error.
FD_STEP = float(torch.finfo(torch.float64).eps) ** (1.0 / 3.0)
CHECK_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-6, 1e-8),
    torch.float32: (1e-3, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}
_NONFINITE = {(True, False): "jvp", (False, True): "estimate", (True, True): "both"}


def central_difference(a: Arguments) -> tuple[Tensors, float]:
    """The float64 estimate of J·v (NOTE [finite-difference check]) over the arguments
    that have a tangent, and the largest perturbation."""
    f, primals, directions = a.with_tangents()
    with torch.no_grad():
        base = f(*primals)
        total = [torch.zeros_like(o) for o in base]
        largest = 0.0
        for k, (p, v) in enumerate(zip(primals, directions, strict=True)):
            v_norm = float(v.abs().max()) if v.numel() else 0.0
            if v_norm == 0.0 or not math.isfinite(v_norm):
                continue  # a zero direction adds nothing; a non-finite one is not checkable
            scale = max(1.0, float(p.abs().max()) if p.numel() else 0.0)
            h = FD_STEP * scale / v_norm
            largest = max(largest, h * v_norm)
            plus = list(primals)
            minus = list(primals)
            plus[k] = p + h * v
            minus[k] = p - h * v
            for acc, hi, lo in zip(total, f(*plus), f(*minus), strict=True):
                acc.add_((hi - lo) / (2.0 * h))
    return tuple(total), largest


def _compare(jvps: Tensors, estimate: Tensors) -> tuple[float, float, str | None]:
    """``(max|jvp - fd|, max(|fd|_inf, |jvp|_inf), nonfinite)`` over the elements where both
    are finite (NOTE [finite-difference check]); ``nonfinite`` says which side holds a NaN
    or infinity where the other is finite: "jvp", "estimate", "both" (each somewhere), or
    None."""
    abs_error = scale = 0.0
    bad_jvp = bad_estimate = False
    for j, reference in zip(jvps, estimate, strict=True):
        if j.numel() == 0:
            continue
        j64 = j.to(torch.float64)
        finite_j, finite_e = torch.isfinite(j64), torch.isfinite(reference)
        bad_jvp = bad_jvp or bool((finite_e & ~finite_j).any())
        bad_estimate = bad_estimate or bool((finite_j & ~finite_e).any())
        both = finite_j & finite_e
        if bool(both.any()):
            j_ok, e_ok = j64[both], reference[both]
            abs_error = max(abs_error, float((j_ok - e_ok).abs().max()))
            scale = max(scale, float(e_ok.abs().max()), float(j_ok.abs().max()))
    return abs_error, scale, _NONFINITE.get((bad_jvp, bad_estimate))


def check_report(
    abs_error: float,
    rel_error: float,
    passed: bool,
    eps: float,
    rtol: float,
    atol: float,
    nonfinite: Any,
) -> dict[str, Any]:
    """The ``check`` field of an answer (options.check), for forward and reverse mode."""
    return {
        "max_abs_error": api_float(abs_error),
        "max_rel_error": api_float(rel_error),
        "passed": bool(passed),
        "eps": api_float(eps),
        "rtol": rtol,
        "atol": atol,
        "nonfinite": nonfinite,
    }


def in_float64(target: Target, a: Arguments, device: torch.device) -> Arguments:
    """``a`` with the target rematerialized in float64 and every tensor cast to it."""

    def wide(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(torch.float64)

    return Arguments(
        target.materialize(torch.float64, device),
        tuple(x.to(torch.float64) for x in a.inputs),
        tuple(wide(t) for t in a.tangents),
        {n: t.to(torch.float64) for n, t in a.parameter_tangents.items()},
    )


def jvp_check(target: Target, a: Arguments, jvps: Tensors, tangent_batch: bool) -> dict[str, Any]:
    """The ``check`` of a /jvp: ``jvps`` (per K direction with ``tangent_batch``) against
    `central_difference` (NOTE [finite-difference check])."""
    dtype = a.inputs[0].dtype if a.inputs else torch.float32
    device = a.inputs[0].device if a.inputs else torch.device("cpu")
    for t in (*a.tangents, *a.parameter_tangents.values()):
        if t is not None:
            dtype, device = t.dtype, t.device
            break
    a64 = in_float64(target, a, device)
    estimate: Tensors
    if tangent_batch:
        given = (*a64.tangents, *a64.parameter_tangents.values())
        k_size = next(int(t.shape[0]) for t in given if t is not None)
        per_k = [
            central_difference(
                a64._replace(
                    tangents=tuple(None if t is None else t[k] for t in a64.tangents),
                    parameter_tangents={n: t[k] for n, t in a64.parameter_tangents.items()},
                )
            )
            for k in range(k_size)
        ]
        estimate = tuple(torch.stack([fd[i] for fd, _ in per_k]) for i in range(len(jvps)))
        eps = max((e for _, e in per_k), default=0.0)
    else:
        estimate, eps = central_difference(a64)
    abs_error, scale, nonfinite = _compare(jvps, estimate)
    rtol, atol = CHECK_TOLERANCES[dtype]
    rel_error = abs_error / scale if scale > 0 else 0.0
    passed = nonfinite is None and abs_error <= atol + rtol * scale
    return check_report(abs_error, rel_error, passed, eps, rtol, atol, nonfinite)


CHECK_SEED = 0


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batched: bool) -> torch.Tensor:
    """Σ <a_i, b_i> in float64 (per k when ``batched``: a has the leading K, b does not,
    unless both have it)."""
    total: torch.Tensor | None = None
    for x, y in zip(a, b, strict=True):
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        if batched:
            if y64.dim() < x64.dim():
                y64 = y64.unsqueeze(0)
            term = (x64 * y64).reshape(x64.shape[0], -1).sum(-1)
        else:
            term = (x64 * y64).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def _compare_dots(
    vjps: Tensors,
    directions: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    jv: Sequence[torch.Tensor],
    batched: bool,
    tolerances: tuple[float, float],
) -> tuple[float, float, bool, str | None]:
    """``(abs_error, rel_error, passed, nonfinite)`` of <Jᵀu, v> against <u, J v>
    (NOTE [VJP check])."""
    rtol, atol = tolerances
    a = _dot(vjps, directions, batched)  # <Jᵀu, v>
    b = _dot(us, jv, batched)  # <u, J v>
    scale_a = _dot([g.abs() for g in vjps], [v.abs() for v in directions], batched)
    scale_b = _dot([u.abs() for u in us], [j.abs() for j in jv], batched)
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    bad = _NONFINITE.get((bool((finite_b & ~finite_a).any()), bool((finite_a & ~finite_b).any())))
    both = finite_a & finite_b
    if not bool(both.any()):
        return 0.0, 0.0, bad is None, bad
    error = (a - b).abs()[both]
    scale = torch.maximum(scale_a, scale_b)[both]
    abs_error = float(error.max())
    rel = float((error / scale.clamp_min(torch.finfo(torch.float64).tiny)).max())
    rel = 0.0 if float(scale.max()) == 0.0 else rel
    ok = bool((error <= atol + rtol * scale).all()) and bad is None
    return abs_error, rel, ok, bad


def _random_directions(
    target64: Materialized,
    inputs: Tensors,
    input_indices: tuple[int, ...],
    parameter_names: tuple[str, ...],
    device: torch.device,
) -> tuple[Arguments, list[torch.Tensor]]:
    """v: one float64 normal direction per argument in 'wrt' (seed CHECK_SEED, in the
    order of 'wrt'), and the float64 arguments with v as their tangents."""
    generator = torch.Generator(device="cpu").manual_seed(CHECK_SEED)
    _, primals = partial_function(target64, inputs, input_indices, parameter_names)
    directions = [
        torch.randn(tuple(p.shape), generator=generator, dtype=torch.float64).to(device)
        for p in primals
    ]
    n = len(input_indices)
    tangents64: list[torch.Tensor | None] = [None] * len(inputs)
    for i, v in zip(input_indices, directions[:n], strict=True):
        tangents64[i] = v
    params64 = dict(zip(parameter_names, directions[n:], strict=True))
    x64 = tuple(x.to(torch.float64) for x in inputs)
    return Arguments(target64, x64, tuple(tangents64), params64), directions


def _forward_jv(
    target: Target, inputs: Tensors, v: Arguments, dtype: torch.dtype, device: torch.device
) -> Tensors | None:
    """J v by forward mode (with its fallbacks) in the request's dtype; None where forward
    mode refuses."""
    try:
        materialized = target.materialize(dtype, device)
        tangents = tuple(None if t is None else t.to(dtype) for t in v.tangents)
        _, jv, _ = jvp_with_fallback(
            ENGINES["functional"],
            materialized,
            inputs,
            tangents,
            {k: t.to(dtype) for k, t in v.parameter_tangents.items()},
        )
    except ForwardADUnsupported:
        return None
    return jv


def vjp_check(
    target: Target,
    inputs: Tensors,
    wrt: tuple[tuple[int, ...], tuple[str, ...]],
    cotangents: OptionalTensors,
    answer: tuple[Tensors, Tensors],
    batched: bool,
) -> dict[str, Any]:
    """The ``check`` of a /vjp (NOTE [VJP check]): ``answer`` is its ``(outputs, vjps)``,
    ``wrt`` its input indices and parameter names."""
    outputs, vjps = answer
    like = vjps[0] if vjps else outputs[0]
    dtype, device = like.dtype, like.device
    target64 = target.materialize(torch.float64, device)
    v, directions = _random_directions(target64, inputs, *wrt, device)
    fd, eps = central_difference(v)
    which = [i for i, c in enumerate(cotangents) if c is not None]
    us = [c for c in cotangents if c is not None]
    tolerances = CHECK_TOLERANCES[dtype]

    def compare(jv: Sequence[torch.Tensor]) -> tuple[float, float, bool, str | None]:
        if not which:
            return 0.0, 0.0, True, None
        return _compare_dots(vjps, directions, us, [jv[i] for i in which], batched, tolerances)

    abs_error, rel_error, passed, nonfinite = compare(fd)
    identity: dict[str, Any] | None = None
    jv = _forward_jv(target, inputs, v, dtype, device)
    if jv is not None:
        i_abs, i_rel, i_ok, _ = compare(jv)
        identity = {
            "max_abs_error": api_float(i_abs),
            "max_rel_error": api_float(i_rel),
            "passed": i_ok,
        }
    ok = passed and (identity is None or identity["passed"])
    return {
        **check_report(abs_error, rel_error, ok, eps, *tolerances, nonfinite),
        "identity": identity,
    }
