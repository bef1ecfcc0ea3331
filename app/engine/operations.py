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

# NOTE [one module: the operations]
# Over 450 lines on purpose: one class per operation (jvp with options, jacobian, hvp,
# linearize, linearized jvp), all with the same call and report protocol, so a new
# operation is written beside the ones it resembles and the shared helpers above them.

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import torch
from torch.func import grad_and_value, jacfwd, vmap
from torch.func import jvp as func_jvp
from torch.func import linearize as func_linearize

from app.engine.devices import api_float
from app.engine.errors import InvalidRequest, TooLarge
from app.engine.fallback import FORWARD, jvp_with_fallback, unsupported_operator
from app.engine.jvp import ENGINES, may_hold_nan
from app.engine.linearize import LinearizeSession, LinearizeStore
from app.engine.target import Materialized, Target

Tensors = tuple[torch.Tensor, ...]
OptionalTensors = tuple[torch.Tensor | None, ...]


class Operation(Protocol):
    """What `compute` runs instead of the plain JVP engine when a task has one."""

    kind: str

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]: ...

    def report(self) -> dict[str, Any]:
        """JSON fields the operation adds to the response (after it ran)."""
        ...


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


def _batched_jvp(
    target: Materialized,
    inputs: Tensors,
    tangents: OptionalTensors,
    parameter_tangents: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """J·V for K directions at once: `torch.func.vmap` over `torch.func.jvp`.

    Inputs without a tangent are held fixed (a zero tangent for every k); the
    outputs do not depend on the direction, so they come out once (out_dims None).
    """
    which = [i for i, t in enumerate(tangents) if t is not None]
    names = list(parameter_tangents)
    f, primals = partial_function(target, inputs, which, names)
    batched = tuple(t for t in tangents if t is not None) + tuple(parameter_tangents.values())

    def one(*directions: torch.Tensor) -> tuple[Tensors, Tensors]:
        result = func_jvp(f, primals, directions)
        return result[0], result[1]

    # out_dims None: the outputs do not depend on the direction (torch's hint is too narrow).
    outputs, jvps = vmap(one, out_dims=(None, 0))(*batched)  # type: ignore[arg-type]
    return tuple(o.detach() for o in outputs), tuple(j.detach() for j in jvps)


def _batched_with_fallback(
    target: Materialized,
    inputs: Tensors,
    tangents: OptionalTensors,
    parameter_tangents: Mapping[str, torch.Tensor],
    fallback: str,
) -> tuple[Tensors, Tensors, str]:
    """`_batched_jvp`; where forward AD lacks an operator's formula and ``fallback`` is
    "auto", each direction alone through `jvp_with_fallback`, the JVPs stacked."""
    try:
        return (*_batched_jvp(target, inputs, tangents, parameter_tangents), FORWARD)
    except (RuntimeError, NotImplementedError) as e:
        if fallback == "none" or unsupported_operator(e) is None:
            raise
    k_size = tangent_batch_size(
        {str(i): t for i, t in enumerate(tangents) if t is not None}, parameter_tangents
    )
    runs = [
        jvp_with_fallback(
            ENGINES["functional"],
            target,
            inputs,
            tuple(None if t is None else t[k] for t in tangents),
            {n: t[k] for n, t in parameter_tangents.items()},
            fallback=fallback,
        )
        for k in range(k_size)
    ]
    jvps = tuple(torch.stack([run[1][i] for run in runs]) for i in range(len(runs[0][1])))
    return runs[0][0], jvps, runs[0][2]


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


def _central_difference(
    target: Materialized,
    inputs: Tensors,
    tangents: OptionalTensors,
    parameter_tangents: Mapping[str, torch.Tensor],
) -> tuple[Tensors, float, dict[str, float]]:
    """The float64 estimate of J·v (NOTE [finite-difference check]), the largest
    perturbation and each argument's step h."""
    which = [i for i, t in enumerate(tangents) if t is not None]
    names = list(parameter_tangents)
    f, primals = partial_function(target, inputs, which, names)
    directions = [t for t in tangents if t is not None] + list(parameter_tangents.values())
    labels = [str(i) for i in which] + names
    with torch.no_grad():
        base = f(*primals)
        total = [torch.zeros_like(o) for o in base]
        largest = 0.0
        steps: dict[str, float] = {}
        for k, (a, v, label) in enumerate(zip(primals, directions, labels, strict=True)):
            v_norm = float(v.abs().max()) if v.numel() else 0.0
            if v_norm == 0.0 or not math.isfinite(v_norm):
                continue  # a zero direction adds nothing; a non-finite one is not checkable
            scale = max(1.0, float(a.abs().max()) if a.numel() else 0.0)
            h = FD_STEP * scale / v_norm
            steps[label] = h
            largest = max(largest, h * v_norm)
            plus = list(primals)
            minus = list(primals)
            plus[k] = a + h * v
            minus[k] = a - h * v
            for acc, hi, lo in zip(total, f(*plus), f(*minus), strict=True):
                acc.add_((hi - lo) / (2.0 * h))
    return tuple(total), largest, steps


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
    nonfinite = {(True, False): "jvp", (False, True): "estimate", (True, True): "both"}
    return abs_error, scale, nonfinite.get((bad_jvp, bad_estimate))


@dataclass(eq=False)
class JVPOperation:
    """``POST /jvp`` with ``options.tangent_batch`` and/or ``options.check``."""

    engine: str = "dual"
    tangent_batch: bool = False
    check_target: Target | None = None  # set for options.check: rematerialized in float64
    fallback: str = "auto"  # options.fallback (NOTE [forward-AD fallback])
    kind: str = "jvp"
    check: dict[str, Any] | None = field(default=None, init=False)
    method: str = field(default=FORWARD, init=False)  # how the JVP was computed

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        # The forward-AD fallbacks apply here as to a plain JVP, so options.check verifies
        # whichever method ran (the response's "method").
        if self.tangent_batch:
            outputs, jvps, self.method = _batched_with_fallback(
                target, inputs, tangents, parameter_tangents, self.fallback
            )
        else:
            outputs, jvps, self.method = jvp_with_fallback(
                ENGINES[self.engine],
                target,
                inputs,
                tangents,
                parameter_tangents,
                fallback=self.fallback,
            )
        if self.check_target is not None:
            self.check = self._check(inputs, tangents, parameter_tangents, jvps)
        return outputs, jvps

    def _check(
        self,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
        jvps: Tensors,
    ) -> dict[str, Any]:
        assert self.check_target is not None
        dtype = inputs[0].dtype if inputs else torch.float32
        device = inputs[0].device if inputs else torch.device("cpu")
        for t in (*tangents, *parameter_tangents.values()):
            if t is not None:
                dtype, device = t.dtype, t.device
                break
        target64 = self.check_target.materialize(torch.float64, device)

        def wide(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(torch.float64)

        x64 = tuple(x.to(torch.float64) for x in inputs)
        estimate: Tensors
        if self.tangent_batch:
            k_size = next(
                int(t.shape[0]) for t in (*tangents, *parameter_tangents.values()) if t is not None
            )
            per_k = []
            for k in range(k_size):
                fd, eps, steps = _central_difference(
                    target64,
                    x64,
                    tuple(None if t is None else t[k].to(torch.float64) for t in tangents),
                    {n: t[k].to(torch.float64) for n, t in parameter_tangents.items()},
                )
                per_k.append((fd, eps))
            estimate = tuple(torch.stack([fd[i] for fd, _ in per_k]) for i in range(len(jvps)))
            eps = max((e for _, e in per_k), default=0.0)
        else:
            estimate, eps, steps = _central_difference(
                target64,
                x64,
                tuple(wide(t) for t in tangents),
                {n: t.to(torch.float64) for n, t in parameter_tangents.items()},
            )
        abs_error, scale, nonfinite = _compare(jvps, estimate)
        rtol, atol = CHECK_TOLERANCES[dtype]
        rel_error = abs_error / scale if scale > 0 else 0.0
        passed = nonfinite is None and abs_error <= atol + rtol * scale
        return check_report(abs_error, rel_error, passed, eps, rtol, atol, nonfinite)

    def report(self) -> dict[str, Any]:
        return {} if self.check is None else {"check": self.check}


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


@dataclass(eq=False)
class JacobianOperation:
    """The full Jacobian by forward mode (`torch.func.jacfwd`).

    Returns the outputs, then one Jacobian per (output, argument), outputs major:
    each of shape ``output.shape + argument.shape``. ``max_elements`` bounds the
    total number of Jacobian entries (checked after one plain forward pass, 413).
    """

    input_indices: tuple[int, ...]
    parameter_names: tuple[str, ...]
    max_elements: int
    kind: str = "jacobian"

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        f, primals = partial_function(target, inputs, self.input_indices, self.parameter_names)
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

    def report(self) -> dict[str, Any]:
        return {}


Reduction = Literal["sum", "mean", "none"]


def scalar_of(outputs: Tensors, output_index: int, reduction: Reduction) -> torch.Tensor:
    """The scalar an HVP is taken of: one output, reduced (422 when it is no scalar)."""
    if not 0 <= output_index < len(outputs):
        raise InvalidRequest(
            f"output_index {output_index} is out of range: the function has "
            f"{len(outputs)} output(s)",
            param="output_index",
        )
    y = outputs[output_index]
    if reduction == "sum":
        return y.sum()
    if reduction == "mean":
        return y.mean()
    if y.numel() != 1:
        raise InvalidRequest(
            f"/hvp needs a scalar-valued function, but output {output_index} has shape "
            f"{list(y.shape)}; set 'reduction' to 'sum' or 'mean' to reduce it",
            param="reduction",
        )
    return y.reshape(())


@dataclass(eq=False)
class HVPOperation:
    """Hessian-vector products by forward-over-reverse: `torch.func.jvp` of
    `torch.func.grad`, with respect to the inputs (and parameters) that have a tangent.

    Returns ``((value,), hvps)`` with one HVP per argument with a tangent, inputs
    first (in input order) then parameters (in the order given).
    """

    output_index: int = 0
    reduction: Reduction = "none"
    tangent_batch: bool = False
    kind: str = "hvp"

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        which = [i for i, t in enumerate(tangents) if t is not None]
        names = list(parameter_tangents)
        f, primals = partial_function(target, inputs, which, names)
        directions = tuple(t for t in tangents if t is not None) + tuple(
            parameter_tangents.values()
        )
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

    def report(self) -> dict[str, Any]:
        return {}


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
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in [*graph.modules(), None]:
        if module is None:
            tensors: list[torch.Tensor | None] = list(kept)
        else:
            tensors = [*module._parameters.values(), *module._buffers.values()]
            tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


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
class LinearizeOperation:
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

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        f, primals = partial_function(target, inputs, self.input_indices, self.parameter_names)
        warnings.filterwarnings("ignore", message=_FOLD_WARNING, category=UserWarning)
        outputs, jvp_fn = func_linearize(f, *primals)
        zeros = tuple(torch.zeros_like(p) for p in primals)
        jvp_fn(*zeros)  # runs the constant folding now, so the size below is what it keeps
        held = _held_bytes(jvp_fn, kept=tuple(inputs))
        if held is None:
            held = 4 * sum(t.nbytes for t in (*primals, *outputs)) + sum(x.nbytes for x in inputs)
        transpose = None
        if self.transpose:
            from app.engine.vjp import make_transpose  # it imports this module

            transpose = make_transpose(f, primals)
            held += transpose.nbytes
        self.session = self.store.add(
            target=self.source,
            dtype=primals[0].dtype if primals else outputs[0].dtype,
            device=outputs[0].device if outputs else torch.device("cpu"),
            argument_names=self.argument_names,
            input_indices=self.input_indices,
            shapes=tuple(tuple(p.shape) for p in primals),
            outputs=len(outputs),
            apply=jvp_fn,
            nbytes=held + SESSION_OVERHEAD_BYTES,
            apply_without=partial(_jvp_without, f, primals),
            transpose=transpose,
        )
        return tuple(o.detach() for o in outputs), ()

    def report(self) -> dict[str, Any]:
        return {}


@dataclass(eq=False)
class LinearizedJVPOperation:
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

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        given: list[torch.Tensor | None] = [tangents[i] for i in self.input_indices]
        given += [parameter_tangents.get(n) for n in self.parameter_names]
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

    def report(self) -> dict[str, Any]:
        return {}


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
