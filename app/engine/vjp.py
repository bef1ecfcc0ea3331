"""Reverse mode: vector-Jacobian products (``POST /vjp``, ``POST /linearize/{id}/vjp``).

``Jᵀ·u`` by `torch.func.vjp` on the device worker, like every other derivative (NOTE
[one dual level per process] in app/engine/worker.py: reverse mode is thread-safe in
PyTorch, but the worker stays the single owner of device work, so the queue, the
deadlines and the memory accounting stay one).

    >>> import torch
    >>> from app.engine.target import Materialized
    >>> m = Materialized(fn=lambda a, s: (a[0] * a[1], a[0].sum()), parameters={}, buffers={})
    >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    >>> op = VJPOperation((0, 1), (), (torch.ones(2), None))  # no cotangent for output 1
    >>> outputs, (gx, gy) = op(m, (x, y), (None, None), {})
    >>> gx.tolist(), gy.tolist()  # y * u, x * u
    ([3.0, 4.0], [1.0, 2.0])

# NOTE [reverse mode: exact or refused]
What carries over from forward mode (NOTE [mixed dual and plain operands] and `_exact` in
app/engine/jvp.py, NOTE [derivative coverage check] in app/engine/derivatives.py):

- No VJP without cotangents, no zero cotangent where none was given. An output whose
  cotangent is ``null`` is left out of the function that is differentiated (`_selected`),
  never fed a dense zero: a zero cotangent meeting an infinite partial derivative is
  ``0 * inf = NaN``, while an output that is not weighted contributes nothing at all. With
  no cotangent at all nothing is differentiated and every entry is an exact zero. The same
  holds for arguments: only ``wrt`` is differentiated, everything else is closed over as a
  constant, so no backward formula of an argument outside ``wrt`` is ever evaluated. A
  cotangent the client gives is used as given (zeros in it included), as a given tangent is
  in forward mode.
- No dropped gradient passes for a number. Eager autograd raises for most operators without
  a backward formula (``not_implemented`` formulas, arguments PyTorch marks
  ``non_differentiable``), and those errors become a 501 naming the operator
  (`reverse_ad_error`). It does not raise everywhere: a custom operator without an autograd
  kernel warns and lets no gradient through, and a float output PyTorch lists as not
  differentiable carries none. So before the first VJP of a (target, dtype, device, shapes,
  wrt, outputs) the forward pass is run once under `CoverageMode`, which follows the
  gradient's path from the ``wrt`` arguments through every operator and checks each
  against derivatives.yaml, exactly as the forward fallbacks' check does (a backward
  formula is what that table lists per argument); the verdict is cached (`CoverageCache`).
  All three are in app/engine/reverse_coverage.py.
  The check is conservative: an operator that receives a ``wrt``-dependent tensor must have
  a formula for it even when its result never reaches a weighted output.
- What does not carry over: forward mode's zero tangents for speed (reverse mode has no
  dual operands to mix), and the fallbacks (a decomposition or a double-VJP for an operator
  without a forward formula): an operator without a backward formula has no reverse-mode
  fallback here, it is refused.

The custom autograd Functions of app/engine/functions.py and app/engine/attention.py each
have a hand-written ``backward``; the check sees the operators their ``forward`` runs (all
with formulas), and their own backward is what autograd runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import vjp as func_vjp
from torch.func import vmap

from app.engine.abstract import Plan
from app.engine.batching import to_device
from app.engine.checks import vjp_check
from app.engine.errors import InvalidRequest
from app.engine.linearize import StorageBytes
from app.engine.protocol import Arguments, CheckedOperation, Operation, OptionalTensors, Tensors
from app.engine.reverse_coverage import COVERAGE, named_refusals
from app.engine.target import Target

REVERSE = "reverse"


# ---------------------------------------------------------------------------
# The VJP.


def _selected(f: Callable[..., Tensors], which: Sequence[int]) -> Callable[..., Any]:
    """``f`` returning only the outputs in ``which``, with every output as aux."""

    def g(*args: torch.Tensor) -> tuple[Tensors, Tensors]:
        outs = f(*args)
        return tuple(outs[i] for i in which), tuple(o.detach() for o in outs)

    return g


def check_cotangent_shapes(
    output_shapes: Sequence[Sequence[int]],
    cotangents: OptionalTensors,
    batched: bool,
    single: bool,
) -> None:
    """422 unless there is one cotangent per output, each shaped like it ([K, ...] when
    ``batched``, the same K everywhere)."""
    if len(cotangents) != len(output_shapes):
        raise InvalidRequest(
            f"Expected {len(output_shapes)} cotangents (one per output, null for a zero one), "
            f"got {len(cotangents)}",
            param="cotangents",
        )
    sizes = set()
    for i, (shape, c) in enumerate(zip(output_shapes, cotangents, strict=True)):
        if c is None:
            continue
        param = "cotangents" if single else f"cotangents.{i}"
        got = list(c.shape)
        ok = got[1:] == list(shape) if batched else got == list(shape)
        if not ok:
            dims = ", ".join(str(d) for d in shape)
            expected = f"[K{', ' + dims if dims else ''}]" if batched else f"[{dims}]"
            why = "the output's shape" + (
                " with a leading K: options.cotangent_batch" if batched else ""
            )
            which = "" if single else f"{i} "
            raise InvalidRequest(
                f"Expected cotangent {which}of shape {expected} ({why}), got {got}",
                param=param,
            )
        if batched:
            sizes.add(got[0])
    if batched:
        if not sizes:
            raise InvalidRequest(
                "options.cotangent_batch needs at least one cotangent (its leading dimension is K)",
                param="options.cotangent_batch",
            )
        if len(sizes) > 1:
            raise InvalidRequest(
                f"With options.cotangent_batch every cotangent needs the same leading K; got "
                f"{sorted(sizes)}",
                param="options.cotangent_batch",
            )
        if 0 in sizes:
            raise InvalidRequest(
                "options.cotangent_batch: K (the leading dimension of the cotangents) is 0; "
                "send at least one",
                param="options.cotangent_batch",
            )


def on_device(cotangents: OptionalTensors, like: torch.Tensor) -> OptionalTensors:
    """The host cotangents cast and moved to ``like``'s dtype and device."""
    return tuple(None if c is None else to_device(c, like.dtype, like.device) for c in cotangents)


def zero_vjps(primals: Tensors, cotangents: OptionalTensors, batched: bool) -> Tensors:
    """Exact zeros, one per primal ([K, ...] when ``batched``): nothing was weighted."""
    k = next((int(c.shape[0]) for c in cotangents if c is not None), 0)
    lead = (k,) if batched else ()
    return tuple(p.new_zeros(lead + tuple(p.shape)) for p in primals)


@dataclass(eq=False)
class VJPOperation(CheckedOperation):
    """``Jᵀu`` with respect to ``input_indices`` then ``parameter_names``, by
    `torch.func.vjp` (``cotangent_batch``: vmap over the VJP, K cotangents per output).

    ``cotangents``: host tensors, one per output, None for an output without one; moved
    to the computation's device here. Returns ``(outputs, vjps)``, one VJP per argument.
    """

    input_indices: tuple[int, ...]
    parameter_names: tuple[str, ...]
    cotangents: OptionalTensors
    cotangent_batch: bool = False
    check_target: Target | None = None  # options.check: rematerialized in float64
    source: Target | None = None  # for the coverage cache's key
    single_output: bool = True
    names: tuple[str, ...] = ()  # of the arguments, in order (a job stores its result so)
    kind: str = "vjp"
    check: dict[str, Any] | None = field(default=None, init=False)
    method: str = field(default=REVERSE, init=False)

    def forward_wrt(self, a: Arguments) -> None:
        return None  # reverse mode: its own check (NOTE [reverse mode: exact or refused])

    def plan_for(self, target: Target, inputs: Sequence[torch.Tensor]) -> Plan:
        """Its `Plan` for the abstract evaluation (NOTE [abstract evaluation])."""
        shapes = [tuple(inputs[i].shape) for i in self.input_indices]
        shapes += [tuple(target.parameter_shapes[p]) for p in self.parameter_names]
        batch = 0
        if self.cotangent_batch:
            batch = next((int(c.shape[0]) for c in self.cotangents if c is not None), 0)
        return Plan(
            "vjp",
            batch=batch,
            directions=len(shapes),
            result_shapes=tuple(shapes),
            check=self.check_target is not None,
        )

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        f, primals = a.partial(self.input_indices, self.parameter_names)
        like = primals[0] if primals else (a.inputs[0] if a.inputs else None)
        cotangents = self.cotangents if like is None else on_device(self.cotangents, like)
        selected = tuple(i for i, c in enumerate(cotangents) if c is not None)
        with named_refusals():
            if selected and primals:
                COVERAGE.check(
                    self.source,
                    a.target,
                    a.inputs,
                    self.input_indices,
                    self.parameter_names,
                    selected,
                )
            outputs, vjps = self._run(f, primals, cotangents)
        if self.check_target is not None:
            wrt = (self.input_indices, self.parameter_names)
            answer = (outputs, vjps)
            self.check = vjp_check(
                self.check_target, a.inputs, wrt, cotangents, answer, self.cotangent_batch
            )
        return outputs, vjps

    def _run(
        self, f: Callable[..., Tensors], primals: Tensors, cotangents: OptionalTensors
    ) -> tuple[Tensors, Tensors]:
        """``(outputs, Jᵀu per argument)``; every output's cotangent shape checked (422)."""
        if not any(c is not None for c in cotangents) or not primals:
            # Shapes first: a wrong cotangent is a 422 even when nothing is differentiated.
            with torch.no_grad():
                outputs = tuple(o.detach() for o in f(*primals))
            check_cotangent_shapes(
                [o.shape for o in outputs], cotangents, self.cotangent_batch, self.single_output
            )
            return outputs, zero_vjps(primals, cotangents, self.cotangent_batch)
        which = [i for i, c in enumerate(cotangents) if c is not None]
        _, vjp_fn, outputs = func_vjp(  # type: ignore[misc]
            _selected(f, which), *primals, has_aux=True
        )
        check_cotangent_shapes(
            [o.shape for o in outputs], cotangents, self.cotangent_batch, self.single_output
        )
        given = tuple(c for c in cotangents if c is not None)
        grads = vmap(vjp_fn)(given) if self.cotangent_batch else vjp_fn(given)
        return tuple(outputs), tuple(g.detach() for g in grads)


# NOTE [VJP check]: options.check of a /vjp is computed in app/engine/checks.py, apart
# from the VJP it tests (`vjp_check`).


# ---------------------------------------------------------------------------
# Linearize sessions that answer both ways (options.transpose).


@dataclass(eq=False)
class Transpose:
    """What a linearize session keeps for ``Jᵀu``: the forward pass's autograd graph at the
    primals (kept alive, so every application is one backward pass), its outputs and
    leaves, and the bytes the graph saved (counted in the session's size)."""

    outputs: Tensors
    leaves: Tensors
    nbytes: int

    @property
    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(o.shape) for o in self.outputs)

    def apply(self, cotangents: OptionalTensors, batched: bool) -> Tensors:
        """``Jᵀu`` per leaf; outputs whose cotangent is None are left out of the backward
        pass (NOTE [reverse mode: exact or refused])."""
        which = [i for i, c in enumerate(cotangents) if c is not None]
        lead: tuple[int, ...] = ()
        if batched:
            lead = (next(int(c.shape[0]) for c in cotangents if c is not None),)
        live = [i for i in which if self.outputs[i].requires_grad]
        if not live or not self.leaves:
            return tuple(leaf.new_zeros(lead + tuple(leaf.shape)) for leaf in self.leaves)
        with named_refusals():
            grads = torch.autograd.grad(
                [self.outputs[i] for i in live],
                list(self.leaves),
                [c for i, c in enumerate(cotangents) if i in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        return tuple(
            leaf.new_zeros(lead + tuple(leaf.shape)) if g is None else g.detach()
            for g, leaf in zip(grads, self.leaves, strict=True)
        )


def make_transpose(f: Callable[..., Tensors], primals: Tensors) -> Transpose:
    """The forward pass with the primals as leaves, its saved tensors counted once per
    storage (NOTE [linearize session size] in app/engine/operations.py)."""
    saved = StorageBytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(t)
        return t

    leaves = tuple(p.detach().requires_grad_(p.is_floating_point()) for p in primals)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = tuple(f(*leaves))
    held = saved.nbytes + sum(o.untyped_storage().nbytes() for o in outputs)
    return Transpose(outputs=outputs, leaves=leaves, nbytes=held)


@dataclass(eq=False)
class LinearizedVJPOperation(Operation):
    """``Jᵀu`` (or ``Jᵀ U`` with ``cotangent_batch``) from a session made with
    options.transpose."""

    transpose: Transpose
    cotangents: OptionalTensors
    cotangent_batch: bool = False
    single_output: bool = True
    kind: str = "linearized_vjp"

    def forward_wrt(self, a: Arguments) -> None:
        return None  # reverse mode: checked when its session was made

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        cotangents = on_device(self.cotangents, self.transpose.outputs[0])
        return (), self.transpose.apply(cotangents, self.cotangent_batch)


def total_elements(tensors: Sequence[torch.Tensor | None]) -> int:
    return sum(math.prod(t.shape) for t in tensors if t is not None)
