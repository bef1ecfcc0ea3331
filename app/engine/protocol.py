"""What every operation is: `Operation`, which `compute` calls in place of the plain JVP
engine with the engine's four arguments, bundled here as `Arguments`, so each operation
only says what it computes (``run``).

    >>> import torch
    >>> from app.engine.target import Materialized
    >>> m = Materialized(fn=lambda a, s: (a[0] * a[1],), parameters={}, buffers={})
    >>> a = Arguments(m, (torch.tensor(2.0), torch.tensor(3.0)), (torch.tensor(1.0), None), {})
    >>> f, primals, directions = a.with_tangents()  # only the input that has a tangent
    >>> f(torch.tensor(5.0))[0].item(), [p.item() for p in primals]
    (15.0, [2.0])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from app.engine.target import Materialized

Tensors = tuple[torch.Tensor, ...]
OptionalTensors = tuple[torch.Tensor | None, ...]
# Differentiated arguments: inputs by position, parameters by name.
Wrt = tuple[tuple[int, ...], tuple[str, ...]]


def partial_function(
    target: Materialized,
    inputs: Tensors,
    input_indices: Sequence[int],
    parameter_names: Sequence[str],
) -> tuple[Callable[..., Tensors], Tensors]:
    """``f(*args)`` of the chosen inputs then the chosen parameters, the rest held fixed,
    and the primals to call it at."""
    fixed_state = {k: v for k, v in target.parameters.items() if k not in parameter_names}
    fixed_state.update(target.buffers)
    n = len(input_indices)

    def f(*args: torch.Tensor) -> Tensors:
        full = list(inputs)
        for i, a in zip(input_indices, args[:n], strict=True):
            full[i] = a
        state = {**fixed_state, **dict(zip(parameter_names, args[n:], strict=True))}
        return target.fn(tuple(full), state)

    primals = tuple(inputs[i] for i in input_indices) + tuple(
        target.parameters[k] for k in parameter_names
    )
    return f, primals


class Arguments(NamedTuple):
    """What `compute` hands an operation: the materialized target, and the inputs and
    tangents cast and moved to the device (None: an input without a tangent)."""

    target: Materialized
    inputs: Tensors
    tangents: OptionalTensors
    parameter_tangents: Mapping[str, torch.Tensor]

    def partial(
        self, input_indices: Sequence[int], parameter_names: Sequence[str]
    ) -> tuple[Callable[..., Tensors], Tensors]:
        """`partial_function` of these arguments."""
        return partial_function(self.target, self.inputs, input_indices, parameter_names)

    def carrying(self) -> Wrt:
        """The inputs (by position) and parameters (by name) that carry a tangent."""
        which = tuple(i for i, t in enumerate(self.tangents) if t is not None)
        return which, tuple(self.parameter_tangents)

    def with_tangents(self) -> tuple[Callable[..., Tensors], Tensors, Tensors]:
        """``(f, primals, directions)`` over the arguments that have a tangent (inputs in
        input order, then parameters in the order given), the rest held fixed."""
        which = [i for i, t in enumerate(self.tangents) if t is not None]
        f, primals = self.partial(which, list(self.parameter_tangents))
        given = tuple(t for t in self.tangents if t is not None)
        return f, primals, given + tuple(self.parameter_tangents.values())


class Operation:
    """What `compute` runs instead of the plain JVP engine when a task has one: it calls
    the operation as it would call an engine, which becomes ``run(Arguments)``. An
    operation with nothing to add to the response keeps this ``report``."""

    kind: str

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        return self.run(Arguments(target, inputs, tangents, parameter_tangents))

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        raise NotImplementedError

    def forward_wrt(self, a: Arguments) -> Wrt | None:
        """The arguments forward mode carries a tangent from, for the coverage check (NOTE
        [forward mode: exact or refused] in app/engine/forward_coverage.py): by default
        those with a tangent; None where the operation checks its own."""
        return a.carrying()

    def report(self) -> dict[str, Any]:
        """JSON fields the operation adds to the response (after it ran)."""
        return {}


class CheckedOperation(Operation):
    """An operation whose options.check result is the response's ``check`` field."""

    check: dict[str, Any] | None

    def report(self) -> dict[str, Any]:
        return {} if self.check is None else {"check": self.check}
