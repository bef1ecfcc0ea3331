"""Operations beyond one JVP: batched tangents, finite-difference checks, Jacobians, HVPs,
linearize-once-apply-many.

Each operation is an object built (and validated) before queueing and set as
``JVPTask.operation``; the device worker's `compute` calls it in place of the
plain JVP engine, on the moved (cast, on-device) inputs and tangents, so every
operation keeps `compute`'s error mapping (507 on OOM, 501 for an operator
without a forward-AD formula, 422 for shape errors) and runs on the device
worker (NOTE [one dual level per process] in `app.engine.worker`).

An operation returns ``(outputs, tensors)``: two flat tuples of tensors that
`compute` brings to the host. What does not fit in tensors (the finite-difference
check, the id of a linearize session) it keeps on itself for the service to read
once the future resolved (`report`).

    >>> import torch
    >>> from app.engine.target import Materialized
    >>> m = Materialized(fn=lambda args, state: (args[0] ** 2,), parameters={}, buffers={})
    >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> op = JVPOperation(engine="functional", tangent_batch=True)
    >>> out, jvps = op(m, (x,), (torch.eye(2, dtype=torch.float64),), {})
    >>> jvps[0].tolist()  # one row per direction: J @ e_k
    [[2.0, 0.0], [0.0, 4.0]]
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch.func import grad_and_value, jacfwd, vmap
from torch.func import jvp as func_jvp
from torch.func import linearize as func_linearize

from app.engine.abstract import check_scalar
from app.engine.checks import jvp_check
from app.engine.errors import InvalidRequest, TooLarge
from app.engine.fallback import FORWARD, jvp_with_fallback, unsupported_operator
from app.engine.jvp import ENGINES, may_hold_nan
from app.engine.linearize import LinearizeSession, LinearizeStore, StorageBytes
from app.engine.protocol import (
    Arguments,
    CheckedOperation,
    Operation,
    OptionalTensors,
    Tensors,
    Wrt,
)
from app.engine.target import Target
from app.engine.vjp import make_transpose


def tangent_batch_size(
    tangents: Mapping[str, torch.Tensor], parameter_tangents: Mapping[str, torch.Tensor]
) -> int:
    """K of a batched request: the leading size every tangent shares (422 otherwise)."""
    labelled = [(f"tangent {k!r}", t) for k, t in tangents.items()]
    labelled += [(f"parameter tangent {k!r}", t) for k, t in parameter_tangents.items()]
    if not labelled:
        raise InvalidRequest(
            "options.tangent_batch needs at least one tangent (its leading dimension is K)",
            param="options.tangent_batch",
        )
    sizes = {int(t.shape[0]) for _, t in labelled}
    if len(sizes) > 1:
        shapes = ", ".join(f"{label} {list(t.shape)}" for label, t in labelled)
        raise InvalidRequest(
            f"With options.tangent_batch every tangent needs the same leading K; got {shapes}",
            param="options.tangent_batch",
        )
    (k,) = sizes
    if k == 0:
        raise InvalidRequest(
            "options.tangent_batch: K (the leading dimension of the tangents) is 0; send at "
            "least one direction",
            param="options.tangent_batch",
        )
    return k


def _batched_jvp(a: Arguments) -> tuple[Tensors, Tensors]:
    """J·V for K directions at once: `torch.func.vmap` over `torch.func.jvp`.

    Inputs without a tangent are held fixed (a zero tangent for every k); the
    outputs do not depend on the direction, so they come out once (out_dims None).
    """
    f, primals, batched = a.with_tangents()

    def one(*directions: torch.Tensor) -> tuple[Tensors, Tensors]:
        result = func_jvp(f, primals, directions)
        return result[0], result[1]

    # out_dims None: the outputs do not depend on the direction (torch's hint is too narrow).
    outputs, jvps = vmap(one, out_dims=(None, 0))(*batched)  # type: ignore[arg-type]
    return tuple(o.detach() for o in outputs), tuple(j.detach() for j in jvps)


def _batched_with_fallback(a: Arguments, fallback: str) -> tuple[Tensors, Tensors, str]:
    """`_batched_jvp`; where forward AD lacks an operator's formula and ``fallback`` is
    "auto", each direction alone through `jvp_with_fallback`, the JVPs stacked."""
    try:
        return (*_batched_jvp(a), FORWARD)
    except (RuntimeError, NotImplementedError) as e:
        if fallback == "none" or unsupported_operator(e) is None:
            raise
    k_size = tangent_batch_size(
        {str(i): t for i, t in enumerate(a.tangents) if t is not None}, a.parameter_tangents
    )
    runs = [
        jvp_with_fallback(
            ENGINES["functional"],
            a.target,
            a.inputs,
            tuple(None if t is None else t[k] for t in a.tangents),
            {n: t[k] for n, t in a.parameter_tangents.items()},
            fallback=fallback,
        )
        for k in range(k_size)
    ]
    jvps = tuple(torch.stack([run[1][i] for run in runs]) for i in range(len(runs[0][1])))
    return runs[0][0], jvps, runs[0][2]


@dataclass(eq=False)
class JVPOperation(CheckedOperation):
    """``POST /jvp`` with ``options.tangent_batch`` and/or ``options.check``."""

    engine: str = "dual"
    tangent_batch: bool = False
    check_target: Target | None = None  # set for options.check: rematerialized in float64
    fallback: str = "auto"  # options.fallback (NOTE [forward-AD fallback])
    kind: str = "jvp"
    check: dict[str, Any] | None = field(default=None, init=False)
    method: str = field(default=FORWARD, init=False)  # how the JVP was computed

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        # The forward-AD fallbacks apply here as to a plain JVP, so options.check verifies
        # whichever method ran (the response's "method").
        if self.tangent_batch:
            outputs, jvps, self.method = _batched_with_fallback(a, self.fallback)
        else:
            outputs, jvps, self.method = jvp_with_fallback(
                ENGINES[self.engine], *a, fallback=self.fallback
            )
        if self.check_target is not None:
            self.check = jvp_check(self.check_target, a, jvps, self.tangent_batch)
        return outputs, jvps


@dataclass(eq=False)
class JacobianOperation(Operation):
    """The full Jacobian by forward mode (`torch.func.jacfwd`).

    Returns the outputs, then one Jacobian per (output, argument), outputs major:
    each of shape ``output.shape + argument.shape``. ``max_elements`` bounds the
    total number of Jacobian entries (checked after one plain forward pass, 413).
    """

    input_indices: tuple[int, ...]
    parameter_names: tuple[str, ...]
    max_elements: int
    kind: str = "jacobian"

    def forward_wrt(self, a: Arguments) -> Wrt:
        return self.input_indices, self.parameter_names

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        f, primals = a.partial(self.input_indices, self.parameter_names)
        with torch.no_grad():
            outputs = tuple(o.detach() for o in f(*primals))
        columns = sum(p.numel() for p in primals)
        entries = sum(o.numel() for o in outputs) * columns
        if entries > self.max_elements:
            raise TooLarge(
                f"The Jacobian would hold {entries} elements ({sum(o.numel() for o in outputs)} "
                f"output elements x {columns} input elements); the limit is "
                f"{self.max_elements} (JVP_MAX_REQUEST_ELEMENTS). Ask for fewer 'wrt' or "
                "use /jvp with tangent_batch",
                param="wrt",
            )
        argnums = tuple(range(len(primals)))
        jac = jacfwd(f, argnums=argnums)(*primals)
        flat = tuple(block.detach() for per_output in jac for block in per_output)
        return outputs, flat


Reduction = Literal["sum", "mean", "none"]


def scalar_of(outputs: Tensors, output_index: int, reduction: Reduction) -> torch.Tensor:
    """The scalar an HVP is taken of: one output, reduced (422 when it is no scalar)."""
    check_scalar([o.shape for o in outputs], output_index, reduction)
    y = outputs[output_index]
    if reduction == "sum":
        return y.sum()
    if reduction == "mean":
        return y.mean()
    return y.reshape(())


@dataclass(eq=False)
class HVPOperation(Operation):
    """Hessian-vector products by forward-over-reverse: `torch.func.jvp` of
    `torch.func.grad`, with respect to the inputs (and parameters) that have a tangent.

    Returns ``((value,), hvps)`` with one HVP per argument with a tangent, inputs
    first (in input order) then parameters (in the order given).
    """

    output_index: int = 0
    reduction: Reduction = "none"
    tangent_batch: bool = False
    kind: str = "hvp"

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        f, primals, directions = a.with_tangents()
        with torch.no_grad():  # the scalar check first, with a clear 422
            value = scalar_of(f(*primals), self.output_index, self.reduction)

        def scalar(*args: torch.Tensor) -> torch.Tensor:
            return scalar_of(f(*args), self.output_index, self.reduction)

        gradient = grad_and_value(scalar, argnums=tuple(range(len(primals))))

        def one(*ts: torch.Tensor) -> Tensors:
            tangent_out = func_jvp(gradient, primals, ts)[1]  # (H·v per argument, d value)
            return tuple(tangent_out[0])

        hvps = vmap(one)(*directions) if self.tangent_batch else one(*directions)
        return (value.detach(),), tuple(h.detach() for h in hvps)


# torch.fx's constant folding (used by torch.func.linearize) warns on every call in
# torch 2.13 ("Attempted to insert a get_attr Node with no underlying reference");
# the graph it builds is correct. The filter is specific to that message and is
# re-added before each call (`warnings.catch_warnings` swaps process-wide state and
# is not thread-safe, so it is not used here).
_FOLD_WARNING = "Attempted to insert a get_attr Node with no underlying reference"
SESSION_OVERHEAD_BYTES = 64 * 1024


def _held_bytes(jvp_fn: Callable[..., Any], kept: Tensors = ()) -> int | None:
    """Bytes of every tensor the linearized function holds, each storage once.

    NOTE [linearize session size]: `torch.func.linearize` traces the JVP into an
    fx graph and constant-folds everything that depends only on the primals; the
    folded graph keeps those tensors (intermediates, and the weights it closes
    over) as its parameters and buffers. They are counted after the first
    application (which runs the folding), one count per storage, with ``kept`` (the
    primals the session keeps for NOTE [linearize without a tangent]). Weights shared
    with the served model are counted too, so this is an upper bound. None when
    the graph cannot be found (another torch release): the caller estimates from
    primal sizes instead.
    """
    graph = inspect.getclosurevars(jvp_fn).nonlocals.get("const_folded_jvp_graph")
    if not isinstance(graph, torch.nn.Module):
        return None
    held = StorageBytes()
    for module in [*graph.modules(), None]:
        if module is None:
            tensors: list[torch.Tensor | None] = list(kept)
        else:
            tensors = [*module._parameters.values(), *module._buffers.values()]
            tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is not None:
                held.add(t)
    return held.nbytes


# NOTE [linearize without a tangent]
# The linearized function takes a tangent for every argument it was linearized in
# ('wrt'). An application that leaves one out must get what a plain tensor gives
# (that argument contributes nothing), but zeros passed to the traced JVP are
# dense: 0 * inf is NaN where that argument's partial derivative is infinite. So
# zeros are passed and the answer kept when it holds no NaN, which proves it exact
# (NOTE [mixed dual and plain operands] in app/engine/jvp.py: the traced graph is
# the same forward-AD formulas on dense tangents); otherwise `_jvp_without`
# computes it again from the session's function and primals with `torch.func.jvp`,
# the missing arguments closed over. The session keeps the primals for that, and
# counts them in its size.
def _jvp_without(
    f: Callable[..., Tensors], primals: Tensors, given: OptionalTensors, batched: bool
) -> Tensors:
    """J·t of ``f`` at ``primals`` with the arguments whose tangent is None held fixed
    (``batched``: every given tangent has a leading K, as with options.tangent_batch)."""
    keep = [k for k, t in enumerate(given) if t is not None]
    if not keep:
        with torch.no_grad():
            return tuple(torch.zeros_like(o) for o in f(*primals))

    def g(*args: torch.Tensor) -> Tensors:
        full = list(primals)
        for k, a in zip(keep, args, strict=True):
            full[k] = a
        return f(*full)

    def one(*ts: torch.Tensor) -> Tensors:
        return tuple(func_jvp(g, tuple(primals[k] for k in keep), ts)[1])

    directions = tuple(t for t in given if t is not None)
    return tuple(vmap(one)(*directions)) if batched else one(*directions)


@dataclass(eq=False)
class LinearizeOperation(Operation):
    """`torch.func.linearize` at the primals; the linearized function becomes a session
    of ``store`` (on this device worker's thread, the only one that ever calls it)."""

    store: LinearizeStore
    source: Target
    input_indices: tuple[int, ...]
    parameter_names: tuple[str, ...]
    argument_names: tuple[str, ...]
    transpose: bool = False  # options.transpose: keep the reverse pass too (app/engine/vjp.py)
    kind: str = "linearize"
    session: LinearizeSession | None = field(default=None, init=False)

    def forward_wrt(self, a: Arguments) -> Wrt:
        return self.input_indices, self.parameter_names

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        f, primals = a.partial(self.input_indices, self.parameter_names)
        warnings.filterwarnings("ignore", message=_FOLD_WARNING, category=UserWarning)
        outputs, jvp_fn = func_linearize(f, *primals)
        zeros = tuple(torch.zeros_like(p) for p in primals)
        jvp_fn(*zeros)  # runs the constant folding now, so the size below is what it keeps
        held = _held_bytes(jvp_fn, kept=tuple(a.inputs))
        if held is None:
            held = 4 * sum(t.nbytes for t in (*primals, *outputs)) + sum(x.nbytes for x in a.inputs)
        transpose = None
        if self.transpose:
            transpose = make_transpose(f, primals)
            held += transpose.nbytes
        session = LinearizeSession(
            target=self.source,
            dtype=primals[0].dtype if primals else outputs[0].dtype,
            device=outputs[0].device if outputs else torch.device("cpu"),
            argument_names=self.argument_names,
            input_indices=self.input_indices,
            shapes=tuple(tuple(p.shape) for p in primals),
            apply=jvp_fn,
            nbytes=held + SESSION_OVERHEAD_BYTES,
            apply_without=partial(_jvp_without, f, primals),
            transpose=transpose,
        )
        self.session = self.store.add(session)
        return tuple(o.detach() for o in outputs), ()


@dataclass(eq=False)
class LinearizedJVPOperation(Operation):
    """J·v (or J·V with ``tangent_batch``) from a linearize session.

    The task's tangents are per input of the target; ``arguments`` picks the
    session's arguments from them (inputs by index, parameters by name), and a
    missing one gets zeros.
    """

    session: LinearizeSession
    input_indices: tuple[int, ...]
    parameter_names: tuple[str, ...]
    tangent_batch: bool = False
    kind: str = "linearized_jvp"

    def forward_wrt(self, a: Arguments) -> None:
        return None  # the session's function was checked when it was made (LinearizeOperation)

    def run(self, a: Arguments) -> tuple[Tensors, Tensors]:
        given: list[torch.Tensor | None] = [a.tangents[i] for i in self.input_indices]
        given += [a.parameter_tangents.get(n) for n in self.parameter_names]
        batch = (  # a 0-d tangent has no shape[0]: K only under tangent_batch
            next((int(t.shape[0]) for t in given if t is not None), None)
            if self.tangent_batch
            else None
        )
        device = self.session.device
        dtype = self.session.dtype

        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            full = (batch, *shape) if self.tangent_batch and batch is not None else shape
            return torch.zeros(full, dtype=dtype, device=device)

        args = tuple(
            zeros(shape) if t is None else t
            for t, shape in zip(given, self.session.shapes, strict=True)
        )
        apply = self.session.apply
        if self.tangent_batch:
            jvps = vmap(lambda *ts: tuple(apply(*ts)))(*args)
        else:
            jvps = apply(*args)
        without = self.session.apply_without
        if any(t is None for t in given) and without is not None and may_hold_nan(tuple(jvps)):
            # NOTE [linearize without a tangent]: zeros proved nothing; hold those fixed.
            jvps = without(tuple(given), self.tangent_batch)
        return (), tuple(j.detach() for j in jvps)


def jvp_operation(
    target: Target, *, engine: str, tangent_batch: bool, check: bool, fallback: str = "auto"
) -> JVPOperation | None:
    """The operation of a ``POST /jvp`` with these options; None for a plain JVP."""
    if not tangent_batch and not check:
        return None
    return JVPOperation(
        engine=engine,
        tangent_batch=tangent_batch,
        check_target=target if check else None,
        fallback=fallback,
    )
