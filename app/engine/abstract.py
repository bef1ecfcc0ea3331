"""Abstract evaluation: what a request will make, known before anything is computed.

    >>> import torch
    >>> from app.engine.target import Materialized, Target
    >>> def build(dtype, device):
    ...     return Materialized(fn=lambda a, s: (a[0] * a[1],), parameters={}, buffers={})
    >>> target = Target("x*y", ("x", "y"), True, build)
    >>> bounds = Bounds(max_tensor_elements=1_000_000, max_bytes=2**30, max_flops=10**12)
    >>> est = estimate(target, ((1000, 1), (1, 1000)), torch.float32, Plan("jvp"), bounds)
    >>> est.outputs[0].shape, est.results[0].shape
    ((1000, 1000), (1000, 1000))
    >>> estimate(target, ((2000, 1), (1, 2000)), torch.float32, Plan("jvp"), bounds)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    app.engine.errors.TooLarge: The operator mul would make a tensor of shape [2000, 2000] ...

# NOTE [abstract evaluation]
Every request's target is first run forward on meta tensors (shapes and dtypes,
no data, no memory), under a dispatch mode that sees every operator the target
calls: each tensor it makes is checked against the element limit as it is made
(so a 2**40-element product is refused at the operator that makes it), its bytes
are counted while it lives (a weak reference per tensor: the peak of the live
bytes, not their sum, so a long elementwise chain is not mistaken for a large
one), and its FLOPs are counted with `torch.utils.flop_counter`'s formulas
(matmul, convolution, attention), plus one per element written by any other
operator (memory-bound work, which that counter ignores).

The operation's own cost (J·v, K directions, the Jacobian's N columns, the HVP's
reverse pass, the finite-difference check's evaluations) is then derived from
that one forward pass (`_derive`): every tangent has the shape of its primal, a
batch of K tangents K times it, so the shapes of every result are exact and the
largest intermediate is the forward's largest times the directions carried with
it. Only FLOPs and peak bytes are estimates (within 2x of the real run's:
tests/services/test_eval_shape.py).

Why not run the operation itself on meta tensors: forward AD keeps one dual
level per process (NOTE [one dual level per process] in app/engine/worker.py),
so a `torch.func.jvp` on the event loop's thread would collide with the device
worker's; and `FlopCounterMode` breaks `torch.func.grad` (its module tracker's
hooks), so the HVP could not be counted. A forward pass on meta tensors needs
neither. It costs 0.1-50 ms (a 10x10 expression to the transformer), paid once
per (target, shapes, dtype, operation): the result is cached (`Estimator`), and
a repeated request pays one dictionary look-up (bench/abstract_eval.py).
"""

# NOTE [one module: abstract evaluation]
# Over 450 lines on purpose: the plan of an operation, its evaluation on meta tensors, the
# bounds and the deadline check share one vocabulary (Plan, Spec, Estimate, Bounds) and
# each feeds the next; NOTE [abstract evaluation] reads top to bottom in one file.

from __future__ import annotations

import collections
import functools
import math
import threading
import time
import weakref
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from app.engine.errors import DeadlineExceeded, InvalidRequest, TooLarge
from app.engine.target import Target

META = torch.device("meta")


class NotEvaluated(InvalidRequest):
    """The forward pass failed on meta tensors (shapes that do not fit the target, or an
    operator that needs data): /eval_shape answers it as a 422; a computing request is
    then run unbounded by its estimate, and the real run gives its own answer (the same
    422 for shapes that do not fit; a model may also use an operator meta tensors lack)."""


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Spec:
    """A tensor without data: its shape and dtype."""

    shape: Shape
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Bounds:
    """The limits a request's computation must stay within (413 past any)."""

    max_tensor_elements: int
    max_bytes: int
    max_flops: int


@dataclass(frozen=True)
class Plan:
    """What the operation does with the target, as far as its shapes and cost go.

    ``kind``: jvp | jacobian | hvp | linearize | vjp. ``batch``: K of tangent_batch (0: none).
    ``directions``: how many arguments have a tangent (or are differentiated).
    ``columns``: the Jacobian's N (elements of every argument differentiated).
    ``result_shapes``: the differentiated arguments' shapes (jacobian, hvp, linearize).
    ``check``: options.check's finite differences. ``output_index``, ``reduction``: the
    HVP's scalar. Hashable: with the target, shapes and dtype, the cache key.
    """

    kind: str
    batch: int = 0
    directions: int = 1
    columns: int = 0
    result_shapes: tuple[Shape, ...] = ()
    check: bool = False
    output_index: int = 0
    reduction: str = "none"
    transpose: bool = False  # linearize with options.transpose: it keeps the reverse pass
    parameters: int = 0  # vjp: how many of the differentiated arguments are parameters


@dataclass(frozen=True)
class Estimate:
    """Everything a request will make: its outputs and results (shapes exact), the
    largest tensor, the peak of its live bytes and its FLOPs (estimates)."""

    outputs: tuple[Spec, ...]
    results: tuple[Spec, ...]
    flops: int
    peak_bytes: int
    largest: int  # elements of the largest tensor made
    largest_operator: str
    # For the time estimate (`Rate.seconds`): compute-bound and memory-bound work.
    matmul_flops: int = 0
    elements: int = 0


# ATen names as the expression language spells them (the rest are the same words).
_LANGUAGE_NAMES = {
    "view": "reshape",
    "_unsafe_view": "reshape",
    "mm": "matmul",
    "bmm": "matmul",
    "expand": "broadcast",
}


def _operator_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    name = (getattr(packet, "__name__", None) or str(func)).removeprefix("aten::")
    return _LANGUAGE_NAMES.get(name, name)


class _Tracer(TorchDispatchMode):
    """Sees every operator of a forward pass on meta tensors (NOTE [abstract evaluation])."""

    def __init__(self, max_elements: int) -> None:
        super().__init__()
        self.max_elements = max_elements
        self.live = 0
        self.peak = 0
        self.total = 0  # bytes of every tensor made, freed or not
        self.largest = 0
        self.largest_operator = ""
        # The largest tensor that depends on an input: the one the operation's directions
        # multiply (a weight, closed over, is made once whatever K is).
        self.largest_varying = 0
        self.varying_operator = ""
        self.matmul_flops = 0
        self.reverse_input_flops = 0
        self.reverse_weight_flops = 0
        self.elements = 0
        self._varying: dict[int, weakref.ref[torch.Tensor]] = {}

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def _varies(self, t: torch.Tensor) -> bool:
        ref = self._varying.get(id(t))
        return ref is not None and ref() is t

    def add_input(self, t: torch.Tensor, *, varying: bool) -> None:
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        if varying:
            self._varying[id(t)] = weakref.ref(t)
            self.largest_varying = max(self.largest_varying, t.numel())

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        inputs = {id(a) for a in given}
        varying = any(self._varies(a) for a in given)
        is_view = bool(getattr(func, "is_view", False))
        flop_formula = flop_registry.get(func.overloadpacket)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            numel = t.numel()
            biggest_dim = max(t.shape, default=0)
            if numel > self.max_elements or biggest_dim > self.max_elements:
                what = f"{numel} elements" + (
                    f", a dimension of {biggest_dim}" if biggest_dim > numel else ""
                )
                raise TooLarge(
                    f"The operator {_operator_name(func)} would make a tensor of shape "
                    f"{list(t.shape)} ({what}); the limit is {self.max_elements} elements "
                    "per tensor (JVP_MAX_TENSOR_ELEMENTS)",
                    param="primals",
                )
            if numel > self.largest:
                self.largest, self.largest_operator = numel, _operator_name(func)
            if varying:
                self._varying[id(t)] = weakref.ref(t)
                if numel > self.largest_varying:
                    self.largest_varying, self.varying_operator = numel, _operator_name(func)
            if is_view or id(t) in inputs:
                continue  # no new memory
            nbytes = numel * t.element_size()
            self.live += nbytes
            self.total += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed, nbytes)
            if flop_formula is None:
                self.elements += numel
        if flop_formula is not None:
            flops = int(flop_formula(*args, **kwargs, out_val=out))
            self.matmul_flops += flops
            # A backward pass makes one such product per operand the gradient reaches
            # (NOTE [reverse-mode FLOPs]); a 1-d operand (addmm's bias) is a reduction.
            operands = [a for a in given if a.dim() >= 2]
            reached = sum(self._varies(a) for a in operands)
            self.reverse_input_flops += flops * reached
            self.reverse_weight_flops += flops * (len(operands) - reached)
        return out


@dataclass(frozen=True)
class Forward:
    """One forward pass of the target, traced on meta tensors."""

    outputs: tuple[Spec, ...]
    inputs: tuple[Spec, ...]
    peak: int
    total: int
    largest: int
    largest_operator: str
    largest_varying: int
    varying_operator: str
    matmul_flops: int
    elements: int
    # NOTE [reverse-mode FLOPs]: what one backward pass spends on products (matmul,
    # convolution, attention): one product per operand the gradient reaches, so a layer
    # x @ W costs one product for the gradient of x (``reverse_input_flops``) and, when
    # the weights are differentiated too, one more for that of W
    # (``reverse_weight_flops``); not the two per product that hold only when every
    # operand is differentiated (a VJP of a model with respect to its inputs was
    # overestimated 1.5-1.9x that way).
    reverse_input_flops: int = 0
    reverse_weight_flops: int = 0


def trace_forward(
    target: Target, shapes: Sequence[Shape], dtype: torch.dtype, max_elements: int
) -> Forward:
    """The target's forward pass at ``shapes`` on meta tensors (413 past the element limit,
    422 when the shapes do not fit the target)."""
    materialized = target.materialize(dtype, META)
    tracer = _Tracer(max_elements)
    inputs = tuple(torch.empty(s, dtype=dtype, device=META) for s in shapes)
    state = {**materialized.parameters, **materialized.buffers}
    try:
        with torch.no_grad(), tracer:
            for x in inputs:
                tracer.add_input(x, varying=True)
            for p in state.values():
                tracer.add_input(p, varying=False)
            outputs = materialized.fn(inputs, state)
            specs = tuple(Spec(tuple(o.shape), o.dtype) for o in outputs)
            del outputs
    except (TooLarge, InvalidRequest):
        raise
    except Exception as e:  # noqa: BLE001 - the real run gives its own error, or succeeds
        text = (str(e).strip() or type(e).__name__).splitlines()[0][:500]
        raise NotEvaluated(f"The computation failed for these inputs: {text}") from None
    return Forward(
        outputs=specs,
        inputs=tuple(Spec(tuple(x.shape), dtype) for x in inputs),
        peak=tracer.peak,
        total=tracer.total,
        largest=tracer.largest,
        largest_operator=tracer.largest_operator,
        largest_varying=tracer.largest_varying,
        varying_operator=tracer.varying_operator or "an input",
        matmul_flops=tracer.matmul_flops,
        elements=tracer.elements,
        reverse_input_flops=tracer.reverse_input_flops,
        reverse_weight_flops=tracer.reverse_weight_flops,
    )


def _bytes(specs: Sequence[Spec]) -> int:
    return sum(s.numel * s.dtype.itemsize for s in specs)


# A long function on purpose: the multipliers of every operation form one table, read
# (and checked against tests/services/test_eval_shape.py) side by side.
def _derive(forward: Forward, plan: Plan, dtype: torch.dtype) -> Estimate:
    """The operation's results and cost from the forward pass (NOTE [abstract evaluation]).

    Multipliers (``work``: how many forward passes' worth of FLOPs; ``carried``: tensors
    per primal intermediate), checked against the real runs in tests/services/test_eval_shape.py:
    J·v of K directions (K = 1 without tangent_batch): the primal, K tangents, and the
    weights' zero tangents once (work 2 + K, carried 1 + K); the Jacobian's N columns
    (work 1 + N, carried 1 + N); an HVP (forward-over-reverse: the reverse pass keeps
    every intermediate, the JVP of both carries K tangents) work 3 (1 + K).
    """
    k = max(plan.batch, 1)
    outputs = forward.outputs
    lead: Shape = (plan.batch,) if plan.batch else ()
    if plan.kind == "jvp":
        results = tuple(Spec(lead + o.shape, o.dtype) for o in outputs)
        work, carried = 2 + k, 1 + k
        peak = carried * forward.peak + _bytes(results)
    elif plan.kind == "jacobian":
        n = max(plan.columns, 1)
        results = tuple(Spec(o.shape + s, o.dtype) for o in outputs for s in plan.result_shapes)
        work, carried = 1 + n, 1 + n
        peak = carried * forward.peak + _bytes(results)
    elif plan.kind == "hvp":
        results = tuple(Spec(lead + s, dtype) for s in plan.result_shapes)
        work, carried = 3 * (1 + k), 1 + k
        peak = 2 * carried * (forward.total + forward.peak) + _bytes(results)
    elif plan.kind == "vjp":
        # Reverse mode keeps every intermediate of the forward pass for the backward one
        # (forward.total, not its peak), then K backward passes (vmap), each about two
        # forward passes of work and an intermediate's gradient per intermediate.
        results = tuple(Spec(lead + s, dtype) for s in plan.result_shapes)
        work, carried = 1 + 2 * k + (3 if plan.check else 0), 1 + k
        peak = forward.total + (1 + k) * forward.peak + _bytes(results)
        backward = forward.reverse_input_flops  # NOTE [reverse-mode FLOPs]
        if plan.parameters:
            backward += forward.reverse_weight_flops
        matmul = (work - 2 * k) * forward.matmul_flops + k * backward
    elif plan.kind == "linearize":
        results = tuple(Spec(o.shape, o.dtype) for o in outputs)  # J·t of the session
        work, carried = 3, 2
        peak = 2 * forward.total + 2 * forward.peak
        if plan.transpose:  # one more forward pass, its autograd graph kept
            work += 1
            peak += forward.total
    else:
        raise ValueError(f"unknown operation {plan.kind!r}")
    if plan.kind != "vjp":
        matmul = work * forward.matmul_flops
    elements = work * forward.elements
    if plan.check:  # 1 + 2 per direction float64 forward passes (NOTE [finite-difference check])
        passes = 1 + 2 * plan.directions * k
        wide = max(1, 8 // dtype.itemsize)
        matmul += passes * forward.matmul_flops
        elements += passes * forward.elements
        peak += wide * (forward.peak + _bytes(outputs))
    # Each direction carries a tangent of every intermediate that depends on an input.
    candidates = [
        (forward.largest, forward.largest_operator),
        (forward.largest_varying * max(carried - 1, 1), forward.varying_operator),
        *((r.numel, "the result") for r in results),
    ]
    largest, operator = max(candidates, key=lambda c: c[0])
    return Estimate(
        outputs=outputs if plan.kind != "hvp" else (Spec((), dtype),),
        results=results,
        flops=matmul + elements,
        peak_bytes=peak,
        largest=largest,
        largest_operator=operator,
        matmul_flops=matmul,
        elements=elements,
    )


def check_bounds(estimate: Estimate, bounds: Bounds) -> None:
    """413 naming the limit, the estimate and the tensor or operator past it."""
    for name, spec in (("output", s) for s in estimate.outputs + estimate.results):
        if spec.numel > bounds.max_tensor_elements:
            raise TooLarge(
                f"The result would hold a tensor ({name}) of shape {list(spec.shape)} "
                f"({spec.numel} elements); the limit is {bounds.max_tensor_elements} elements "
                "per tensor (JVP_MAX_TENSOR_ELEMENTS)",
                param="primals",
            )
    if estimate.largest > bounds.max_tensor_elements:
        raise TooLarge(
            f"The operator {estimate.largest_operator} would make a tensor of "
            f"{estimate.largest} elements with every direction this operation carries; the "
            f"limit is {bounds.max_tensor_elements} elements per tensor "
            "(JVP_MAX_TENSOR_ELEMENTS). Send fewer directions or smaller tensors",
            param="primals",
        )
    if estimate.peak_bytes > bounds.max_bytes:
        raise TooLarge(
            f"The computation would need about {estimate.peak_bytes} bytes at its peak "
            f"(its largest tensor: {estimate.largest} elements, made by "
            f"{estimate.largest_operator}); the limit is {bounds.max_bytes} bytes per request "
            "(JVP_MAX_REQUEST_BYTES)",
            param="primals",
        )
    if estimate.flops > bounds.max_flops:
        raise TooLarge(
            f"The computation would take about {estimate.flops} floating-point operations; "
            f"the limit is {bounds.max_flops} per request (JVP_MAX_REQUEST_FLOPS)",
            param="primals",
        )


def estimate(
    target: Target, shapes: Sequence[Shape], dtype: torch.dtype, plan: Plan, bounds: Bounds
) -> Estimate:
    """The request's estimate, uncached (see `Estimator`): 413 when a dimension, an input
    or any tensor the computation makes passes ``bounds.max_tensor_elements``, or the
    estimate another bound of ``bounds``; 422 when the shapes do not fit the target (or an
    HVP's output is no scalar)."""
    max_elements = bounds.max_tensor_elements
    for i, shape in enumerate(shapes):
        if any(d > max_elements for d in shape):
            name = target.input_names[i] if i < len(target.input_names) else str(i)
            raise TooLarge(
                f"Tensor 'primals.{name}' has shape {list(shape)}: a dimension over "
                f"{max_elements} (JVP_MAX_TENSOR_ELEMENTS)",
                param=f"primals.{name}",
            )
    forward = trace_forward(target, shapes, dtype, max_elements)
    if plan.kind == "hvp":
        check_scalar([o.shape for o in forward.outputs], plan.output_index, plan.reduction)
    result = _derive(forward, plan, dtype)
    check_bounds(result, bounds)
    return result


def check_scalar(shapes: Sequence[Sequence[int]], output_index: int, reduction: str) -> None:
    """The 422s of the scalar an HVP is taken of, on the outputs' shapes: the output must
    exist, and be a scalar unless ``reduction`` reduces it. Run here on meta shapes before
    anything runs, and by `app.engine.operations.scalar_of` on the real outputs."""
    if not 0 <= output_index < len(shapes):
        raise InvalidRequest(
            f"output_index {output_index} is out of range: the function has "
            f"{len(shapes)} output(s)",
            param="output_index",
        )
    shape = shapes[output_index]
    if reduction == "none" and math.prod(shape) != 1:
        raise InvalidRequest(
            f"/hvp needs a scalar-valued function, but output {output_index} has shape "
            f"{list(shape)}; set 'reduction' to 'sum' or 'mean' to reduce it",
            param="reduction",
        )


class Estimator:
    """`estimate` within the element bound, cached per (target, shapes, dtype, plan), so a
    repeated request pays one dictionary look-up, then the bytes and FLOPs bounds of the
    request's device. Refusals are cached too (a fresh error is raised each time)."""

    def __init__(self, max_tensor_elements: int, *, max_entries: int = 4096) -> None:
        self.max_tensor_elements = max_tensor_elements
        # What is cached is checked against the element bound only; each call checks the
        # bytes and FLOPs of its own device.
        self._elements = Bounds(max_tensor_elements, math.inf, math.inf)  # type: ignore[arg-type]
        self.max_entries = max_entries
        self._cache: collections.OrderedDict[Hashable, Estimate | tuple[type, str, str | None]]
        self._cache = collections.OrderedDict()
        self._lock = threading.Lock()

    def has(
        self, target: Target, shapes: tuple[Shape, ...], dtype: torch.dtype, plan: Plan
    ) -> bool:
        """Whether this evaluation is cached (a call would be a dictionary look-up)."""
        return (target, shapes, dtype, plan) in self._cache

    def __call__(
        self,
        target: Target,
        shapes: tuple[Shape, ...],
        dtype: torch.dtype,
        plan: Plan,
        bounds: Bounds | None = None,
        *,
        strict: bool = False,
    ) -> Estimate | None:
        """The estimate; None when the forward pass failed on meta tensors (`NotEvaluated`,
        raised instead when ``strict``)."""
        key = (target, shapes, dtype, plan)
        found = self._cache.get(key)
        if found is None:
            try:
                found = estimate(target, shapes, dtype, plan, self._elements)
            except (TooLarge, InvalidRequest) as e:
                found = (type(e), e.message, e.param)
            with self._lock:
                self._cache[key] = found
                if len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        if isinstance(found, tuple):
            cls, message, param = found
            if cls is NotEvaluated and not strict:
                return None
            raise cls(message, param=param)
        # The element bounds held when it was evaluated; the device's bytes and FLOPs here.
        if bounds is not None and (
            found.peak_bytes > bounds.max_bytes or found.flops > bounds.max_flops
        ):
            check_bounds(found, bounds)
        return found


@dataclass
class Rate:
    """How fast a device computes, measured once at start-up (`measure_rate`)."""

    matmul_flops_per_s: float
    elements_per_s: float
    measured: dict[str, float] = field(default_factory=dict)

    def seconds(self, estimate: Estimate) -> float:
        """The least time the estimate's work can take here (the measured rates are a
        best case, so this errs on the short side: no request is refused that could fit)."""
        return (
            estimate.matmul_flops / self.matmul_flops_per_s
            + estimate.elements / self.elements_per_s
        )


def measure_rate(device: torch.device, *, budget_s: float = 0.02) -> Rate:
    """Matmul FLOPs and elementwise elements per second on ``device`` (about 2x
    ``budget_s``): the best of a few runs each."""

    def best(fn: Any, work: float) -> float:
        fn()  # warm
        _sync(device)
        fastest = math.inf
        until = time.perf_counter() + budget_s
        while True:
            started = time.perf_counter()
            fn()
            _sync(device)
            fastest = min(fastest, time.perf_counter() - started)
            if time.perf_counter() > until:
                break
        return work / max(fastest, 1e-9)

    n = 256
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    x = torch.randn(1 << 20, device=device)
    matmul = best(lambda: a @ b, 2.0 * n**3)
    elementwise = best(lambda: torch.sin(x), float(x.numel()))
    return Rate(matmul, elementwise, {"matmul": matmul, "elementwise": elementwise})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_deadline(estimate: Estimate, rate: Rate | None, deadline: float | None) -> float:
    """The estimated seconds of the work; 504 at once when they cannot fit before
    ``deadline`` (a `time.monotonic` instant)."""
    if rate is None:
        return 0.0
    seconds = rate.seconds(estimate)
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if seconds > remaining:
            raise DeadlineExceeded(
                f"The computation would take at least {seconds:.3g} s on this device "
                f"({estimate.flops} floating-point operations); {max(remaining, 0):.3g} s "
                "of the request's deadline remain (JVP_REQUEST_TIMEOUT_S)"
            )
    return seconds


class DeadlineWatch(TorchDispatchMode):
    """Raises `DeadlineExceeded` at the first operator past ``deadline``: for work the
    estimate says is long, so a request past its deadline frees the worker between two
    operators instead of computing to the end (never on the tiny path: each operator
    pays a Python call)."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded(
                "The request passed its deadline while computing; the computation was stopped"
            )
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=64)
def _plain(directions: int) -> Plan:
    return Plan("jvp", directions=directions)


def plan_of(
    target: Target,
    inputs: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor | None],
    parameter_tangents: Mapping[str, torch.Tensor],
    operation: Any,
) -> Plan | None:
    """The `Plan` of a task's operation (None: a plain JVP is ``Plan("jvp")``); None for
    an operation on a linearize session (bounded when the session was made)."""
    from app.engine.operations import (
        HVPOperation,
        JacobianOperation,
        JVPOperation,
        LinearizeOperation,
    )

    if operation is None:  # the hot path: one Plan per number of directions
        return _plain(sum(t is not None for t in tangents) + len(parameter_tangents))
    plan_for = getattr(operation, "plan_for", None)  # an operation that says its own plan
    if plan_for is not None:
        plan: Plan = plan_for(target, inputs)
        if plan.kind == "vjp":  # which of its arguments are weights (NOTE [reverse-mode FLOPs])
            plan = replace(plan, parameters=len(operation.parameter_names))
        return plan
    given = [t for t in tangents if t is not None] + list(parameter_tangents.values())
    if isinstance(operation, JVPOperation):
        batch = int(given[0].shape[0]) if operation.tangent_batch and given else 0
        return Plan(
            "jvp", batch=batch, directions=len(given), check=operation.check_target is not None
        )
    if isinstance(operation, JacobianOperation | LinearizeOperation):
        shapes = [tuple(inputs[i].shape) for i in operation.input_indices]
        shapes += [tuple(target.parameter_shapes[p]) for p in operation.parameter_names]
        return Plan(
            operation.kind,
            columns=sum(math.prod(s) for s in shapes),
            result_shapes=tuple(shapes),
            directions=len(shapes),
            transpose=getattr(operation, "transpose", False),
        )
    if isinstance(operation, HVPOperation):
        batch = int(given[0].shape[0]) if operation.tangent_batch and given else 0
        shapes = [tuple(x.shape) for x, t in zip(inputs, tangents, strict=True) if t is not None]
        shapes += [tuple(target.parameter_shapes[p]) for p in parameter_tangents]
        return Plan(
            "hvp",
            batch=batch,
            directions=len(given),
            result_shapes=tuple(shapes),
            output_index=operation.output_index,
            reduction=operation.reduction,
        )
    return None
