"""The two JVP paths: dual tensors (``fwAD``) and ``torch.func.jvp``.

Both are called only from a device worker (see `app.engine.worker`): the
forward-AD level is one per process, so two threads must never be inside one at
once. Both return plain (non-dual), detached tensors.

An input or parameter without a tangent contributes exactly nothing to the JVP,
as a plain tensor does in forward AD (PyTorch treats it as a constant): in the
dual path it stays a plain tensor, in the functional path it is closed over.
Small ones are given a zero tangent for speed first, and the result is kept only
when that provably changed nothing (NOTE [mixed dual and plain operands]).
Outputs that do not depend on any tangent get an explicit zero JVP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp as func_jvp

from app.engine.protocol import Arguments
from app.engine.target import Materialized

Tensors = tuple[torch.Tensor, ...]
OptionalTensors = tuple[torch.Tensor | None, ...]
# A JVP engine: (target, inputs, tangents, parameter tangents) -> (outputs, jvps).
JVPEngine = Callable[
    [Materialized, Tensors, OptionalTensors, Mapping[str, torch.Tensor]], tuple[Tensors, Tensors]
]


# NOTE [mixed dual and plain operands]
# In PyTorch 2.13 an operator whose operands mix a dual tensor and a plain one
# (``d + y``, ``d * y``, ``pow(d, y)``) gives the plain side an efficient-zero
# tangent, whose kernels infer shapes through Python meta functions: 87-200 µs
# per operator for 10x10 tensors on this project's 2-core machine, against 3-5 µs
# when every operand is dual (bench/mixed_operands.py; bench/README.md has the
# table). So small plain operands (up to ZERO_DUAL_MAX_ELEMENTS; above it the zero
# tangent's arithmetic costs more than the slow dispatch) first get a dense zero
# tangent, and the result is kept only if no JVP element is NaN (one sum per
# output: a NaN makes it NaN); otherwise the JVP is computed again with those
# operands plain. Why that is exact:
#
# An efficient-zero tangent is a strong zero (ZeroTensor * inf is 0), a dense
# zero is not (0 * inf is NaN): that is how a zero tangent used to put NaN into
# ``x ** y`` at x = -1 (the y term is 0 * log(-1)). Every forward-AD formula is
# linear in the tangents: the output tangent is built from the input tangents by
# products with coefficients computed from the primals, sums, and per-element
# selections (where, masked_fill, gather, index). So, element by element, every
# tangent of the zero-tangent run is either the plain run's value or NaN:
# a product c * 0 is +-0 for a finite c and NaN for an infinite or NaN one; a sum
# with a +-0 term equals the plain run's sum (the sign of an exact zero aside),
# with a NaN term it is NaN; a selection picks, at each element, the same
# operand in both runs. NaN never turns back into a number in IEEE arithmetic
# (NaN * 0 is NaN). Hence a zero-tangent JVP free of NaN equals the plain-operand
# JVP (as numbers: -0.0 may read 0.0; and were a formula to sum the same terms
# with another kernel when a tangent is absent, the last bit could differ: the
# tests hold both to 1e-15 relative), and one holding a NaN is recomputed with
# the plain operands, which is the definition of the answer. The rerun costs a
# second JVP only where a NaN shows: a singular point (0 * inf), a NaN input, or
# a true JVP that is NaN. Inputs without a tangent are never perturbed in the
# primal computation, so the outputs of both runs are the same.
#
# Measured (bench/mixed_operands.py, bench/README.md): the check costs about 5 µs
# per JVP (37 against 32 µs for 10x10 x**2 + y**2, 183 against 178 µs for the
# mlp); plain operands, exact too, cost 118 and 357 µs. Computing the tangent-free
# subtrees of an expression on plain tensors still leaves one mixed operator where
# they meet the dual ones, and a zero tangent only where an operator's coefficient
# is finite for every finite primal (add, sub) leaves out mul, whose coefficient,
# the other operand, can be infinite.
ZERO_DUAL_MAX_ELEMENTS = 65_536


def _small(x: torch.Tensor) -> bool:
    return x.is_floating_point() and x.numel() <= ZERO_DUAL_MAX_ELEMENTS


def _or_zeros(tangent: torch.Tensor | None, primal: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(primal) if tangent is None else tangent


def may_hold_nan(tensors: Tensors) -> bool:
    """True when some element of ``tensors`` is NaN; also, harmlessly, when a sum overflows
    both ways (+inf + -inf). One sum per tensor: cheaper than ``isnan().any()`` (3 µs
    against 5 µs on 10x10, 3 µs against 9 µs on 32x64)."""
    return any(
        t.is_floating_point() and t.numel() > 0 and math.isnan(t.sum().item()) for t in tensors
    )


def gives_zero_tangents(
    target: Materialized, inputs: Tensors, tangents: OptionalTensors, parameter_tangents: Mapping
) -> bool:
    """Whether the fast run would give some operand without a tangent a zero tangent."""
    return any(t is None and _small(x) for x, t in zip(inputs, tangents, strict=True)) or any(
        name not in parameter_tangents and _small(p) for name, p in target.parameters.items()
    )


def no_tangents(target: Materialized, inputs: Tensors) -> tuple[Tensors, Tensors]:
    """The outputs, and zero JVPs: nothing carries a tangent, so nothing contributes."""
    with torch.no_grad():
        outputs = target.fn(inputs, {**target.parameters, **target.buffers})
    return tuple(o.detach() for o in outputs), tuple(torch.zeros_like(o) for o in outputs)


def verified(
    run: Callable[[bool], tuple[Tensors, Tensors]], zero_tangents: bool
) -> tuple[Tensors, Tensors]:
    """``run(True)`` (zero tangents for small plain operands) when that is provably the same
    as ``run(False)`` (NOTE [mixed dual and plain operands]), else ``run(False)``."""
    if zero_tangents:
        outputs, jvps = run(True)
        if not may_hold_nan(jvps):
            return outputs, jvps
    return run(False)


def _exact(compute: Callable[[Arguments, bool], tuple[Tensors, Tensors]]) -> JVPEngine:
    """The engine that runs ``compute`` with zero tangents where that is exact, else with
    plain operands (NOTE [mixed dual and plain operands]); no JVP at all without any
    tangent."""

    def engine(
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        if all(t is None for t in tangents) and not parameter_tangents:
            return no_tangents(target, inputs)
        a = Arguments(target, inputs, tangents, parameter_tangents)
        return verified(lambda zeros: compute(a, zeros), gives_zero_tangents(*a))

    return engine


def _dual(a: Arguments, zeros: bool) -> tuple[Tensors, Tensors]:
    target, inputs, tangents, parameter_tangents = a

    def plain(x: torch.Tensor) -> torch.Tensor:
        return fwAD.make_dual(x, torch.zeros_like(x)) if zeros and _small(x) else x

    with fwAD.dual_level():
        dual_inputs = tuple(
            plain(x) if t is None else fwAD.make_dual(x, t)
            for x, t in zip(inputs, tangents, strict=True)
        )
        state = {name: plain(p) for name, p in target.parameters.items()}
        for name, t in parameter_tangents.items():
            state[name] = fwAD.make_dual(target.parameters[name], t)
        # Buffers stay plain: batch norm refuses a tangent on its running statistics.
        state.update(target.buffers)
        outputs = target.fn(dual_inputs, state)
        primals_out, tangents_out = [], []
        for out in outputs:
            primal, tangent = fwAD.unpack_dual(out)
            primals_out.append(primal.detach())
            tangents_out.append(torch.zeros_like(primal) if tangent is None else tangent.detach())
    return tuple(primals_out), tuple(tangents_out)


def functional(a: Arguments, zeros: bool) -> tuple[Tensors, Tensors]:
    """One `torch.func.jvp`; ``zeros``: small operands without a tangent get a zero one.
    No data-dependent control flow, so it runs under `torch.func.vmap` too."""
    target, inputs, tangents, parameter_tangents = a
    which = [i for i, t in enumerate(tangents) if t is not None or (zeros and _small(inputs[i]))]
    fixed_state: dict[str, torch.Tensor] = dict(target.buffers)  # plain, as in jvp_dual
    diff_state: dict[str, torch.Tensor] = {}
    for name, value in target.parameters.items():
        given = name in parameter_tangents or (zeros and _small(value))
        (diff_state if given else fixed_state)[name] = value

    def f(diff_inputs: Tensors, diff_params: dict[str, torch.Tensor]) -> Tensors:
        full = list(inputs)
        for i, x in zip(which, diff_inputs, strict=True):
            full[i] = x
        return target.fn(tuple(full), {**fixed_state, **diff_params})

    primals = (tuple(inputs[i] for i in which), diff_state)
    tangent_tree = (
        tuple(_or_zeros(tangents[i], inputs[i]) for i in which),
        {k: _or_zeros(parameter_tangents.get(k), v) for k, v in diff_state.items()},
    )
    result = func_jvp(f, primals, tangent_tree)
    outputs, jvps = result[0], result[1]
    return tuple(o.detach() for o in outputs), tuple(t.detach() for t in jvps)


# J·v with `fwAD.make_dual` / `fwAD.unpack_dual` inside a dual level of this call's own.
jvp_dual = _exact(_dual)
# J·v with `torch.func.jvp` of what has a tangent, the rest closed over (small operands
# first with a zero tangent: NOTE [mixed dual and plain operands]).
jvp_functional = _exact(functional)
ENGINES = {"dual": jvp_dual, "functional": jvp_functional}
