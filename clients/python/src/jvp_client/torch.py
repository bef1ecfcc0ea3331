"""The remote function as one differentiable node of a PyTorch program.

`remote` returns a callable whose inputs and outputs are torch tensors, backed by a
``torch.autograd.Function``: its forward asks the service for the output (``POST /jvp``
without tangents), its ``jvp`` (forward mode, inside ``torch.autograd.forward_ad``) is
``POST /jvp``, and its ``backward`` (``.backward()``, ``torch.autograd.grad``) is
``POST /vjp`` with respect to exactly the inputs that need a gradient::

    import torch
    from jvp_client import JVPClient
    from jvp_client.torch import remote

    f = remote(JVPClient(), expression="sin(x) * y")
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss = (f(x=x, y=torch.ones(3, dtype=torch.float64)) ** 2).sum()
    loss.backward()  # x.grad from POST /vjp

Call it with the inputs by name, or positionally in the order ``GET /models/{name}``
lists them (an expression: its variables in order of first appearance). For a model,
``parameter_deltas={"name": d}`` takes zero tensors d standing for a displacement of the
served parameter: the function is evaluated at the served weights (d must be zero), and
d's tangent (forward mode) or gradient (reverse mode) is the derivative with respect to
that parameter there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._variables import RemoteTarget, expression_variables

if TYPE_CHECKING:
    from ._client import JVPClient

__all__ = ["RemoteFunction", "expression_variables", "remote"]


class _Spec:
    """What one call needs besides its tensors (a plain object: Function.apply's first
    argument)."""

    def __init__(self, fn: RemoteFunction, names: Sequence[str], parameters: Sequence[str]) -> None:
        self.fn = fn
        self.names = list(names)
        self.parameters = list(parameters)
        self.several = False


class _Remote(torch.autograd.Function):
    @staticmethod
    def forward(spec: _Spec, *tensors: torch.Tensor) -> Any:
        n = len(spec.names)
        for name, d in zip(spec.parameters, tensors[n:], strict=True):
            if bool((d != 0).any()):
                raise ValueError(
                    f"parameter_deltas[{name!r}] must be zero: the service evaluates the "
                    "model at its served weights"
                )
        primals = {name: t.detach() for name, t in zip(spec.names, tensors[:n], strict=True)}
        result = spec.fn._call_jvp(primals, None, None)
        outputs = result.output
        spec.several = isinstance(outputs, list)
        return tuple(outputs) if spec.several else outputs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        spec, *tensors = inputs
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        spec: _Spec = ctx.spec
        tensors = ctx.saved_tensors
        n = len(spec.names)
        needs = ctx.needs_input_grad[1:]
        wrt = [name for name, need in zip(spec.names, needs[:n], strict=True) if need]
        wrt += [name for name, need in zip(spec.parameters, needs[n:], strict=True) if need]
        if not wrt or all(g is None for g in grads):
            return (None, *(None for _ in tensors))
        primals = {name: t.detach() for name, t in zip(spec.names, tensors[:n], strict=True)}
        cotangents: Any = tuple(grads) if spec.several else grads[0]
        result = spec.fn.client.vjp(
            expression=spec.fn.expression,
            model=spec.fn.model,
            primals=primals,
            cotangents=cotangents,
            wrt=wrt,
        )
        out: list[torch.Tensor | None] = []
        for name, t in zip([*spec.names, *spec.parameters], tensors, strict=True):
            g = result.vjp.get(name)
            out.append(None if g is None else torch.as_tensor(g).to(dtype=t.dtype, device=t.device))
        return (None, *out)

    @staticmethod
    def jvp(ctx: Any, spec_t: Any, *tangents: torch.Tensor | None) -> Any:
        spec: _Spec = ctx.spec
        tensors = ctx.saved_tensors
        n = len(spec.names)
        primals = {name: t.detach() for name, t in zip(spec.names, tensors[:n], strict=True)}
        given = {name: t for name, t in zip(spec.names, tangents[:n], strict=True) if t is not None}
        params = {
            name: t for name, t in zip(spec.parameters, tangents[n:], strict=True) if t is not None
        }
        result = spec.fn._call_jvp(primals, given or None, params or None)
        jvps = result.jvp
        return tuple(jvps) if spec.several else jvps


class RemoteFunction(RemoteTarget):
    """The callable `remote` returns; ``.names`` lists its inputs in positional order."""

    def _call_jvp(
        self,
        primals: Mapping[str, torch.Tensor],
        tangents: Mapping[str, torch.Tensor] | None,
        parameter_tangents: Mapping[str, torch.Tensor] | None,
    ) -> Any:
        return self.client.jvp(
            expression=self.expression,
            model=self.model,
            primals=dict(primals),
            tangents=None if tangents is None else dict(tangents),
            parameter_tangents=None if parameter_tangents is None else dict(parameter_tangents),
        )

    def __call__(
        self,
        *args: torch.Tensor,
        parameter_deltas: Mapping[str, torch.Tensor] | None = None,
        **kwargs: torch.Tensor,
    ) -> Any:
        given = self.bind(args, kwargs)
        deltas = dict(parameter_deltas or {})
        if deltas and self.model is None:
            raise ValueError("parameter_deltas= is for models only")
        spec = _Spec(self, self.names, list(deltas))
        tensors = [given[n] for n in self.names] + list(deltas.values())
        return _Remote.apply(spec, *tensors)  # type: ignore[no-untyped-call]


def remote(
    client: JVPClient, *, expression: str | None = None, model: str | None = None
) -> RemoteFunction:
    """The service's function as a differentiable torch callable (see the module)."""
    return RemoteFunction(client, expression=expression, model=model)
