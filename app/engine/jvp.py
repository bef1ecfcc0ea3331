"""The two JVP paths: dual tensors (``fwAD``) and ``torch.func.jvp``.

Both are called only from a device worker (see `app.engine.worker`): the
forward-AD level is one per process, so two threads must never be inside one at
once. Both return plain (non-dual), detached tensors.

Inputs and parameters without a tangent get a zero tangent: in the dual path
they simply stay plain tensors (which forward AD treats as constants), in the
functional path they are closed over instead of being differentiated. Outputs
that do not depend on any tangent get an explicit zero JVP.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp as func_jvp

from app.engine.target import Materialized

Tensors = tuple[torch.Tensor, ...]


# NOTE [mixed dual and plain operands]
# In PyTorch 2.13 an operator whose operands mix a dual tensor and a plain one
# (``d + y``, ``linear(d, W)``, ``d * 2.0``) takes a slow path through the Python
# reference kernels (torch._refs): about 270-500 µs for 10x10 tensors on this
# project's 2-core machine, against 30-40 µs when every operand is dual. So the
# dual path gives small plain operands a zero tangent. Above ZERO_DUAL_MAX_ELEMENTS
# the zero tangent's arithmetic (for a weight: one more matmul) costs more than the
# slow dispatch, and the operand stays plain.
ZERO_DUAL_MAX_ELEMENTS = 65_536


def _small(x: torch.Tensor) -> bool:
    return x.is_floating_point() and x.numel() <= ZERO_DUAL_MAX_ELEMENTS


def _or_zeros(tangent: torch.Tensor | None, primal: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(primal) if tangent is None else tangent


def _zero_dual(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a dual tensor with a zero tangent, when small and floating; else ``x``."""
    return fwAD.make_dual(x, torch.zeros_like(x)) if _small(x) else x


def jvp_dual(
    target: Materialized,
    inputs: Tensors,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """J·v with `fwAD.make_dual` / `fwAD.unpack_dual` inside a dual level of this call's own."""
    with fwAD.dual_level():
        dual_inputs = tuple(
            _zero_dual(x) if t is None else fwAD.make_dual(x, t)
            for x, t in zip(inputs, tangents, strict=True)
        )
        state = {name: _zero_dual(p) for name, p in target.parameters.items()}
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


def jvp_functional(
    target: Materialized,
    inputs: Tensors,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """J·v with `torch.func.jvp`: what has a tangent, and small operands with a zero one
    (NOTE [mixed dual and plain operands]); the rest is closed over."""
    if all(t is None for t in tangents) and not parameter_tangents:
        with torch.no_grad():
            outputs = target.fn(inputs, {**target.parameters, **target.buffers})
        return outputs, tuple(torch.zeros_like(o) for o in outputs)
    which = [i for i, t in enumerate(tangents) if t is not None or _small(inputs[i])]
    fixed_state: dict[str, torch.Tensor] = dict(target.buffers)  # plain, as in jvp_dual
    diff_state: dict[str, torch.Tensor] = {}
    for name, value in target.parameters.items():
        small_or_given = name in parameter_tangents or _small(value)
        (diff_state if small_or_given else fixed_state)[name] = value

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


ENGINES = {"dual": jvp_dual, "functional": jvp_functional}
