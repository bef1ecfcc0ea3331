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


def jvp_dual(
    target: Materialized,
    inputs: Tensors,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """J·v with `fwAD.make_dual` / `fwAD.unpack_dual` inside a dual level of this call's own."""
    with fwAD.dual_level():
        dual_inputs = tuple(
            x if t is None else fwAD.make_dual(x, t) for x, t in zip(inputs, tangents, strict=True)
        )
        state = dict(target.parameters)
        for name, t in parameter_tangents.items():
            state[name] = fwAD.make_dual(state[name], t)
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
    """J·v with `torch.func.jvp`, differentiating only what has a tangent."""
    which = [i for i, t in enumerate(tangents) if t is not None]
    fixed_state = {k: v for k, v in target.parameters.items() if k not in parameter_tangents}
    fixed_state.update(target.buffers)

    def f(diff_inputs: Tensors, diff_params: dict[str, torch.Tensor]) -> Tensors:
        full = list(inputs)
        for i, x in zip(which, diff_inputs, strict=True):
            full[i] = x
        return target.fn(tuple(full), {**fixed_state, **diff_params})

    if not which and not parameter_tangents:
        with torch.no_grad():
            outputs = f((), {})
        return outputs, tuple(torch.zeros_like(o) for o in outputs)
    primals = (
        tuple(inputs[i] for i in which),
        {k: target.parameters[k] for k in parameter_tangents},
    )
    tangent_tree = (tuple(tangents[i] for i in which), dict(parameter_tangents))
    result = func_jvp(f, primals, tangent_tree)
    outputs, jvps = result[0], result[1]
    return tuple(o.detach() for o in outputs), tuple(t.detach() for t in jvps)


ENGINES = {"dual": jvp_dual, "functional": jvp_functional}
