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
  formula is what that table lists per argument); the verdict is cached (`check_coverage`).
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

import collections
import math
import re
import threading
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import vjp as func_vjp
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from app.engine import derivatives as coverage_table
from app.engine.abstract import Plan
from app.engine.batching import to_device
from app.engine.derivatives import NotCovered
from app.engine.devices import api_float
from app.engine.errors import (
    EngineError,
    ForwardADUnsupported,
    InvalidRequest,
    ReverseADUnsupported,
)
from app.engine.fallback import jvp_with_fallback
from app.engine.jvp import ENGINES
from app.engine.operations import (
    CHECK_TOLERANCES,
    _central_difference,
    check_report,
    partial_function,
)
from app.engine.target import Materialized, Target

Tensors = tuple[torch.Tensor, ...]
OptionalTensors = tuple[torch.Tensor | None, ...]
REVERSE = "reverse"

# What eager autograd raises for an operator (or argument) without a backward formula.
_NO_BACKWARD = (
    re.compile(r"derivative for (?:aten::)?'?([\w.]+)'? is not implemented"),
    re.compile(r"The function '([\w.]+)' is not differentiable with respect to argument"),
    re.compile(r"autograd kernel was not registered to the Autograd key\(s\) but we are trying "
               r"to backprop through it.*?([\w:.]+)"),
)  # fmt: skip


def reverse_ad_error(error: BaseException) -> ReverseADUnsupported | None:
    """The 501 of an autograd error that names an operator without a backward formula."""
    text = str(error)
    for pattern in _NO_BACKWARD:
        match = pattern.search(text)
        if match:
            return ReverseADUnsupported(
                f"Operator {match.group(1)} has no backward (reverse-mode) formula in PyTorch "
                f"{torch.__version__}: {text.strip().splitlines()[0][:300]}"
            )
    return None


# ---------------------------------------------------------------------------
# NOTE [reverse mode: exact or refused]: the coverage check.


class CoverageMode(TorchDispatchMode):
    """Follows the gradient's path through a forward pass and records the first operator
    that would drop it (`NotCovered`), per PyTorch's derivatives.yaml."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref[torch.Tensor]] = {}
        self._dead: dict[int, tuple[weakref.ref[torch.Tensor], NotCovered]] = {}
        self.gap: NotCovered | None = None

    def mark(self, t: torch.Tensor) -> None:
        self._live[id(t)] = weakref.ref(t)

    def is_live(self, t: Any) -> bool:
        ref = self._live.get(id(t))
        return isinstance(t, torch.Tensor) and ref is not None and ref() is t

    def dead(self, t: Any) -> NotCovered | None:
        found = self._dead.get(id(t))
        return found[1] if found is not None and found[0]() is t else None

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.gap is not None:
            return out
        given = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        for a in given:
            gap = self.dead(a)
            if gap is not None:
                self.gap = gap
                return out
        if not any(self.is_live(a) for a in given):
            return out
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        floats = [t for t in outputs if t.dtype.is_floating_point or t.dtype.is_complex]
        if not floats:
            return out  # integer or boolean results carry no gradient in any mode
        base = coverage_table._base_name(func)
        if base in coverage_table._VALUE_INDEPENDENT:
            return out
        gap = self._check(func, args, kwargs)
        if gap is not None:
            self.gap = gap
            return out
        entry = coverage_table.coverage(func) if isinstance(func, torch._ops.OpOverload) else None
        flags = entry.differentiable_outputs if entry is not None else None
        name = coverage_table._name(func)
        for i, t in enumerate(outputs):
            if not (t.dtype.is_floating_point or t.dtype.is_complex):
                continue
            if flags is not None and i < len(flags) and not flags[i]:
                why = NotCovered(name, f"its output {i} has no derivative")
                self._dead[id(t)] = (weakref.ref(t), why)
            else:
                self.mark(t)
        return out

    def _check(
        self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> NotCovered | None:
        name = coverage_table._name(func)
        if not isinstance(func, torch._ops.OpOverload):
            return NotCovered(name, "not an aten operator, so its derivative is unknown")
        entry = coverage_table.coverage(func)
        if entry is None:
            namespace, _, base = func._schema.name.partition("::")
            if base in coverage_table._EXACT_WITHOUT_ENTRY:
                return None
            if namespace != "aten":
                return NotCovered(name, f"a {namespace} operator, with no derivative formula")
            return NotCovered(name, "PyTorch lists no derivative formula for it")
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            leaves = tree_leaves(value)
            if any(self.is_live(v) for v in leaves) and not entry.arguments.get(arg.name, False):
                return NotCovered(name, f"no derivative for its argument {arg.name!r}")
        return None


def find_gap(
    target: Materialized,
    inputs: Tensors,
    input_indices: Sequence[int],
    parameter_names: Sequence[str],
    selected: Sequence[int],
) -> NotCovered | None:
    """One forward pass under `CoverageMode` with the ``wrt`` arguments live: the first
    operator on the gradient's path without a backward formula, or None."""
    f, primals = partial_function(target, inputs, input_indices, parameter_names)
    mode = CoverageMode()
    args = tuple(p.detach().requires_grad_(p.is_floating_point()) for p in primals)
    with torch.enable_grad(), mode:
        for a in args:
            mode.mark(a)
        outputs = f(*args)
        for i in selected:
            gap = mode.dead(outputs[i])
            if gap is not None and mode.gap is None:
                mode.gap = gap
        del outputs
    return mode.gap


class CoverageCache:
    """`find_gap` once per (target, dtype, device, shapes, wrt, selected outputs)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._verdicts: collections.OrderedDict[Hashable, NotCovered | None]
        self._verdicts = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(
        self,
        source: Target | None,
        target: Materialized,
        inputs: Tensors,
        input_indices: tuple[int, ...],
        parameter_names: tuple[str, ...],
        selected: tuple[int, ...],
    ) -> None:
        """Raise `ReverseADUnsupported` (501) naming the operator that would drop the
        gradient; cached when ``source`` is given (a Target is hashed by identity)."""
        key = None
        if source is not None and inputs:
            dtype, device = inputs[0].dtype, inputs[0].device
            shapes = tuple(tuple(x.shape) for x in inputs)
            key = (source, dtype, device, shapes, input_indices, parameter_names, selected)
        if key is not None and key in self._verdicts:
            gap = self._verdicts[key]
        else:
            gap = find_gap(target, inputs, input_indices, parameter_names, selected)
            if key is not None:
                with self._lock:
                    self._verdicts[key] = gap
                    if len(self._verdicts) > self.max_entries:
                        self._verdicts.popitem(last=False)
        if gap is not None:
            raise ReverseADUnsupported(
                f"Operator {gap.operator} has no backward (reverse-mode) formula for what the "
                f"gradient carries into it ({gap.reason}) in PyTorch {torch.__version__}; "
                "the VJP would silently drop it, so it is refused. Leave the argument that "
                "reaches it out of 'wrt'"
            )


COVERAGE = CoverageCache()


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


def zero_vjps(primals: Tensors, cotangents: OptionalTensors, batched: bool) -> Tensors:
    """Exact zeros, one per primal ([K, ...] when ``batched``): nothing was weighted."""
    k = next((int(c.shape[0]) for c in cotangents if c is not None), 0)
    lead = (k,) if batched else ()
    return tuple(p.new_zeros(lead + tuple(p.shape)) for p in primals)


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


CHECK_SEED = 0


@dataclass(eq=False)
class VJPOperation:
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

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        f, primals = partial_function(target, inputs, self.input_indices, self.parameter_names)
        like = primals[0] if primals else (inputs[0] if inputs else None)
        if like is not None:
            cotangents = tuple(
                None if c is None else to_device(c, like.dtype, like.device)
                for c in self.cotangents
            )
        else:
            cotangents = self.cotangents
        selected = tuple(i for i, c in enumerate(cotangents) if c is not None)
        try:
            if selected and primals:
                COVERAGE.check(
                    self.source,
                    target,
                    inputs,
                    self.input_indices,
                    self.parameter_names,
                    selected,
                )
            outputs, vjps = self._run(f, primals, cotangents)
        except EngineError:
            raise
        except (RuntimeError, NotImplementedError) as e:
            refused = reverse_ad_error(e)
            if refused is not None:
                raise refused from None
            raise
        if self.check_target is not None:
            self.check = self._check(inputs, cotangents, outputs, vjps)
        return outputs, vjps

    def _run(
        self, f: Callable[..., Tensors], primals: Tensors, cotangents: OptionalTensors
    ) -> tuple[Tensors, Tensors]:
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

    # NOTE [VJP check]
    # options.check tests the VJP under test (in the request's dtype) two ways with one
    # random direction v (float64 normal, seed CHECK_SEED, per argument in 'wrt'):
    #   1. against float64 central differences: <Jᵀu, v> against <u, FD(J v)>, FD as in
    #      NOTE [finite-difference check] (app/engine/operations.py);
    #   2. the dot-product identity <u, J v> = <Jᵀu, v>, J v by forward mode (with its
    #      fallbacks) in the request's dtype ("identity"; null when forward mode refuses).
    # Each compares two scalars per cotangent (per k with cotangent_batch). A dot product
    # of random vectors may cancel to near zero, so the scale it is judged against is the
    # magnitude of its terms, max(Σ|u||J v|, Σ|Jᵀu||v|), not the two values: passed means
    # |a - b| <= atol + rtol * scale with CHECK_TOLERANCES of the dtype; max_rel_error is
    # |a - b| / scale. A NaN or infinity in the VJP where the estimate is finite (or the
    # other way) fails it, as in the JVP's check ("nonfinite").
    def _check(
        self,
        inputs: Tensors,
        cotangents: OptionalTensors,
        outputs: Tensors,
        vjps: Tensors,
    ) -> dict[str, Any]:
        assert self.check_target is not None
        like = vjps[0] if vjps else outputs[0]
        dtype, device = like.dtype, like.device
        target64 = self.check_target.materialize(torch.float64, device)
        generator = torch.Generator(device="cpu").manual_seed(CHECK_SEED)
        _, primals = partial_function(target64, inputs, self.input_indices, self.parameter_names)
        directions = [
            torch.randn(tuple(p.shape), generator=generator, dtype=torch.float64).to(device)
            for p in primals
        ]
        n = len(self.input_indices)
        tangents64: list[torch.Tensor | None] = [None] * len(inputs)
        for i, v in zip(self.input_indices, directions[:n], strict=True):
            tangents64[i] = v
        params64 = dict(zip(self.parameter_names, directions[n:], strict=True))
        x64 = tuple(x.to(torch.float64) for x in inputs)
        fd, eps, _ = _central_difference(target64, x64, tuple(tangents64), params64)
        which = [i for i, c in enumerate(cotangents) if c is not None]
        us = [c for c in cotangents if c is not None]
        batched = self.cotangent_batch
        rtol, atol = CHECK_TOLERANCES[dtype]

        def compare(
            jv: Sequence[torch.Tensor],
        ) -> tuple[float, float, bool, str | None]:
            a = _dot(vjps, directions, batched)  # <Jᵀu, v>
            b = _dot(us, jv, batched)  # <u, J v>
            scale_a = _dot([g.abs() for g in vjps], [v.abs() for v in directions], batched)
            scale_b = _dot([u.abs() for u in us], [j.abs() for j in jv], batched)
            finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
            nonfinite = {(True, False): "jvp", (False, True): "estimate", (True, True): "both"}
            bad = nonfinite.get(
                (bool((finite_b & ~finite_a).any()), bool((finite_a & ~finite_b).any()))
            )
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

        if not which:
            abs_error, rel_error, passed, nonfinite = 0.0, 0.0, True, None
        else:
            abs_error, rel_error, passed, nonfinite = compare([fd[i] for i in which])
        identity: dict[str, Any] | None = None
        try:
            materialized = self.check_target.materialize(dtype, device)
            tangents = tuple(None if t is None else t.to(dtype) for t in tangents64)
            _, jv, _ = jvp_with_fallback(
                ENGINES["functional"],
                materialized,
                inputs,
                tangents,
                {k: v.to(dtype) for k, v in params64.items()},
            )
        except ForwardADUnsupported:
            jv = None
        if jv is not None:
            if which:
                i_abs, i_rel, i_ok, _ = compare([jv[i] for i in which])
            else:
                i_abs, i_rel, i_ok = 0.0, 0.0, True
            identity = {
                "max_abs_error": api_float(i_abs),
                "max_rel_error": api_float(i_rel),
                "passed": i_ok,
            }
        ok = passed and (identity is None or identity["passed"])
        return {
            **check_report(abs_error, rel_error, ok, eps, rtol, atol, nonfinite),
            "identity": identity,
        }

    def report(self) -> dict[str, Any]:
        return {} if self.check is None else {"check": self.check}


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
        try:
            grads = torch.autograd.grad(
                [self.outputs[i] for i in live],
                list(self.leaves),
                [c for i, c in enumerate(cotangents) if i in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        except (RuntimeError, NotImplementedError) as e:
            refused = reverse_ad_error(e)
            if refused is not None:
                raise refused from None
            raise
        return tuple(
            leaf.new_zeros(lead + tuple(leaf.shape)) if g is None else g.detach()
            for g, leaf in zip(grads, self.leaves, strict=True)
        )


def make_transpose(f: Callable[..., Tensors], primals: Tensors) -> Transpose:
    """The forward pass with the primals as leaves, its saved tensors counted once per
    storage (NOTE [linearize session size] in app/engine/operations.py)."""
    seen: set[tuple[str, int]] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            saved += storage.nbytes()
        return t

    leaves = tuple(p.detach().requires_grad_(p.is_floating_point()) for p in primals)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = tuple(f(*leaves))
    held = saved + sum(o.untyped_storage().nbytes() for o in outputs)
    return Transpose(outputs=outputs, leaves=leaves, nbytes=held)


@dataclass(eq=False)
class LinearizedVJPOperation:
    """``Jᵀu`` (or ``Jᵀ U`` with ``cotangent_batch``) from a session made with
    options.transpose."""

    transpose: Transpose
    cotangents: OptionalTensors
    cotangent_batch: bool = False
    single_output: bool = True
    kind: str = "linearized_vjp"

    def __call__(
        self,
        target: Materialized,
        inputs: Tensors,
        tangents: OptionalTensors,
        parameter_tangents: Mapping[str, torch.Tensor],
    ) -> tuple[Tensors, Tensors]:
        like = self.transpose.outputs[0]
        cotangents = tuple(
            None if c is None else to_device(c, like.dtype, like.device) for c in self.cotangents
        )
        return (), self.transpose.apply(cotangents, self.cotangent_batch)

    def report(self) -> dict[str, Any]:
        return {}


def total_elements(tensors: Sequence[torch.Tensor | None]) -> int:
    return sum(math.prod(t.shape) for t in tensors if t is not None)
