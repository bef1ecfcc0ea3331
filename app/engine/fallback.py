"""JVPs through operators that have no forward-AD formula.

# NOTE [forward-AD fallback]
Some operators have a backward formula but no forward one: in PyTorch 2.13
``_cdist_forward``, ``_pdist_forward``, ``_embedding_bag``, ``grid_sampler_2d``,
``multi_margin_loss``, ``segment_reduce``, ``igamma`` and the CPU flash attention
kernel among them. Forward AD stops at them with "Trying to use forward AD with
X that does not support it". With ``options.fallback = "auto"`` the service then
tries, in order:

1. ``"decomposed"``: trace the function once with `make_fx` on this request's
   primals, replacing the failing operators by decompositions into operators that
   do have a formula (PyTorch's own table, `torch._decomp.decomposition_table`,
   and for what it leaves out, `PROJECT_DECOMPOSITIONS`), then run the usual
   forward-mode JVP on the traced graph. Only the operators that failed are
   decomposed (a decomposition may itself hit another such operator; that one is
   added and the trace repeated), so every other operator keeps its kernel. The
   trace runs below autograd, so it works alike for eager modules and exported
   programs; it is not reused across requests, because a real-mode trace bakes in
   any value-dependent Python control flow of the request it was made on. Each
   request starts with plain forward AD, so ``method`` depends only on the
   request (which inputs and parameters carry tangents), never on earlier ones.
2. ``"double_vjp"``: reverse mode applied twice. ``g(u) = J^T u`` is linear in
   ``u``, so its VJP with ``v`` is ``J v``: two `torch.autograd.grad` calls, the
   first with ``create_graph=True``. Works wherever the backward is itself
   differentiable (``grid_sampler_2d``; ``igamma`` in its second argument).
3. Else `ForwardADUnsupported` (501), naming the operator and why each fallback
   failed.

Both are sound by construction, not by hope: before either answers, the graph
it will run is traced and checked (NOTE [derivative coverage check] in
app/engine/derivatives.py): every operator a tangent reaches must carry a
derivative for that argument, per PyTorch's derivatives.yaml. A decomposition
that ends in a ``prims`` operator (``igamma`` -> ``prims.igamma``, which forward
AD runs as a constant) or a double-VJP through an argument PyTorch marks
``not_implemented`` (``igamma``'s ``self``) is refused, and a decomposition
must also compute the kernel's own values (`_refuse_other_values`). Only the
operators of `FALLBACK_OPERATORS` get a fallback at all (NOTE [fallback
coverage]).

``fallback = "none"`` answers the 501 at once. The method that ran is reported
as the response's ``method``.
"""

# NOTE [one module: the fallbacks]
# Over 450 lines on purpose: the two fallbacks (decomposition, double VJP) and the exactness
# checks that decide whether either may answer are one mechanism. Apart, a check would sit
# away from the formula it vouches for; `jvp_with_fallback` is their one decision ladder.

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch._decomp import decomposition_table
from torch.fx.experimental.proxy_tensor import make_fx

from app.engine.derivatives import NotCovered, first_uncovered
from app.engine.errors import ForwardADUnsupported, first_line
from app.engine.target import Materialized

Tensors = tuple[torch.Tensor, ...]
JVPFunction = Callable[
    [Materialized, Tensors, tuple[torch.Tensor | None, ...], Mapping[str, torch.Tensor]],
    tuple[Tensors, Tensors],
]

FORWARD = "forward"
DECOMPOSED = "decomposed"
DOUBLE_VJP = "double_vjp"

_NO_FORWARD_AD = re.compile(r"Trying to use forward AD with (\S+) that does not support it")
_CUSTOM_WITHOUT_JVP = "jvp function for custom autograd.Function"
_MAX_ROUNDS = 8  # decomposition rounds (each adds the operator the last one hit)

aten = torch.ops.aten


@dataclass(frozen=True)
class Covered:
    """What the fallbacks do for one operator without a forward-AD formula.

    ``arguments``: the arguments a tangent may be on, answered by ``method``;
    ``refused``: floating arguments with no derivative in PyTorch (a tangent on
    one is a 501 naming the operator). Each pair is tested against float64
    central differences (tests/models/test_fallback_coverage.py).
    """

    method: str
    arguments: tuple[str, ...]
    refused: tuple[str, ...] = ()
    call: str = ""  # the user-facing call that reaches it


# NOTE [fallback coverage]
# The fallbacks act only on the operators listed here: each (operator, argument)
# pair is tested (a parametrized test is generated from this table), and the
# README lists them. Forward AD stopping at any other operator is a 501 at once,
# even where a fallback might work: exact or refused. The coverage check (NOTE
# [derivative coverage check]) still vets every graph a fallback runs, so a
# listed operator inside a model that also runs, say, a prims operator on a
# tangent is refused too. ``_segment_reduce`` and ``_ctc_loss`` have neither a
# usable decomposition nor a differentiable backward: listed with no arguments.
FALLBACK_OPERATORS: Mapping[str, Covered] = MappingProxyType(
    {
        "_cdist_forward": Covered("decomposed", ("x1", "x2"), call="torch.cdist"),
        # cdist with p = 2 on more than 25 rows takes the matrix-product form.
        "_euclidean_dist": Covered(
            "decomposed", ("x1", "x2"), call="torch.cdist (p = 2, more than 25 rows)"
        ),
        "_pdist_forward": Covered("decomposed", ("input",), call="F.pdist"),
        "_embedding_bag": Covered(
            "decomposed", ("weight", "per_sample_weights"), call="F.embedding_bag"
        ),
        "grid_sampler_2d": Covered("decomposed", ("input", "grid"), call="F.grid_sample (4-D)"),
        "grid_sampler_3d": Covered("double_vjp", ("input", "grid"), call="F.grid_sample (5-D)"),
        "multi_margin_loss": Covered("decomposed", ("self",), call="F.multi_margin_loss"),
        # PyTorch's decomposition computes another value (`_refuse_other_values`), and the
        # backward is not differentiable: refused.
        "multilabel_margin_loss_forward": Covered(
            "double_vjp", (), ("self",), call="F.multilabel_margin_loss"
        ),
        "igamma": Covered("double_vjp", ("other",), ("self",), call="torch.igamma"),
        "igammac": Covered("double_vjp", ("other",), ("self",), call="torch.igammac"),
        "index_reduce": Covered(
            "double_vjp", ("self", "source"), call="Tensor.index_reduce ('amax', 'amin')"
        ),
        "segment_reduce": Covered("double_vjp", (), ("data",), call="torch.segment_reduce"),
        "_ctc_loss": Covered("double_vjp", (), ("log_probs",), call="F.ctc_loss"),
    }
)


def unsupported_operator(error: BaseException) -> str | None:
    """The operator a forward-AD failure names (``"_cdist_forward"``), else None."""
    match = _NO_FORWARD_AD.search(str(error))
    return match.group(1) if match else None


def _is_forward_ad_gap(error: BaseException) -> bool:
    return unsupported_operator(error) is not None or _CUSTOM_WITHOUT_JVP in str(error)


# ---------------------------------------------------------------------------
# The project's own decompositions: what torch._decomp leaves out (2.13).
# Each computes the operator's value from operators that have forward-AD
# formulas; the extra outputs backward kernels use are computed as well, so a
# graph that reads them still runs.


def _cdist_forward(
    x1: torch.Tensor, x2: torch.Tensor, p: float, compute_mode: int | None = None
) -> torch.Tensor:
    """``cdist``: p-norm distances of ``[..., P, M]`` and ``[..., R, M]`` rows -> ``[..., P, R]``.

    `torch.linalg.vector_norm`'s JVP is 0 where a distance is 0, as cdist's backward is.
    """
    return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)


def _pdist_forward(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``pdist``: distances of the rows ``i < j`` of ``[N, M]``, in row-major order."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    return torch.linalg.vector_norm(x[i] - x[j], ord=p, dim=-1)


_SUM, _MEAN, _MAX = 0, 1, 2


def _embedding_bag(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = _SUM,
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_embedding_bag`` (1-D ``indices``, bags starting at ``offsets``) by gather + index_add.

    Returns ``(output, offset2bag, bag_size, max_indices)`` like the kernel.
    ``scale_grad_by_freq`` and ``sparse`` only change the backward; they are ignored.
    """
    num_bags = offsets.numel() - (1 if include_last_offset else 0)
    dim = weight.shape[1]
    positions = torch.arange(indices.numel(), device=indices.device)
    # The bag of each index: how many bag starts (after the first) lie at or before it.
    offset2bag = torch.bucketize(positions, offsets[1:num_bags], right=True)
    keep = (
        indices != padding_idx if padding_idx >= 0 else torch.ones_like(indices, dtype=torch.bool)
    )
    rows = weight[indices] * keep.unsqueeze(-1).to(weight.dtype)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    bag_size = torch.zeros(num_bags, dtype=torch.long, device=indices.device).index_add(
        0, offset2bag, keep.long()
    )
    if mode == _MAX:
        fill = torch.finfo(weight.dtype).min
        rows = torch.where(keep.unsqueeze(-1), rows, torch.full_like(rows, fill))
        index = offset2bag.unsqueeze(-1).expand(-1, dim)
        output = torch.zeros(num_bags, dim, dtype=weight.dtype, device=weight.device)
        output = output.scatter_reduce(0, index, rows, reduce="amax", include_self=False)
        output = torch.where(bag_size.unsqueeze(-1) > 0, output, torch.zeros_like(output))
        max_indices = torch.zeros(num_bags, dim, dtype=torch.long, device=indices.device)
        return output, offset2bag, bag_size, max_indices
    output = torch.zeros(num_bags, dim, dtype=rows.dtype, device=weight.device)
    output = output.index_add(0, offset2bag, rows)
    if mode == _MEAN:
        output = output / bag_size.clamp(min=1).unsqueeze(-1).to(output.dtype)
    return output, offset2bag, bag_size, bag_size.clone()


PROJECT_DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    aten._cdist_forward.default: _cdist_forward,
    aten._pdist_forward.default: _pdist_forward,
    aten._embedding_bag.default: _embedding_bag,
    aten._embedding_bag_forward_only.default: _embedding_bag,
}
"""Operator -> decomposition, for operators `torch._decomp` has no entry for."""


def decompositions_for(names: set[str]) -> dict[Any, Callable[..., Any]]:
    """Every decomposition (all overloads) of the operators named (``"_cdist_forward"``).

    PyTorch's own entries win; the project's fill the gaps. ``_embedding_bag`` brings
    ``_embedding_bag_forward_only`` with it (tracing without grad picks that one).
    """
    if "_embedding_bag" in names:
        names = names | {"_embedding_bag_forward_only"}
    table: dict[Any, Callable[..., Any]] = {}
    for source in (PROJECT_DECOMPOSITIONS, decomposition_table):
        for op, fn in source.items():
            packet = getattr(op, "overloadpacket", None)
            if packet is not None and packet.__name__ in names:
                table[op] = fn
    return table


def _flat(target: Materialized, n: int) -> Callable[..., Tensors]:
    """``target.fn`` as a function of positional tensors: inputs, then parameters and buffers."""
    names = [*target.parameters, *target.buffers]

    def flat(*args: torch.Tensor) -> Tensors:
        return tuple(target.fn(tuple(args[:n]), dict(zip(names, args[n:], strict=True))))

    return flat


def _state_values(target: Materialized) -> list[torch.Tensor]:
    return [*target.parameters.values(), *target.buffers.values()]


def _carrying(
    target: Materialized,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
) -> list[int]:
    """Positions, among `_flat`'s arguments, of the tensors that carry a tangent."""
    n = len(tangents)
    carrying = [i for i, t in enumerate(tangents) if t is not None]
    carrying += [n + i for i, k in enumerate(target.parameters) if k in parameter_tangents]
    return carrying


def decompose(
    target: Materialized, inputs: Tensors, names: set[str]
) -> tuple[Materialized, torch.fx.GraphModule]:
    """``target`` traced on ``inputs`` with the named operators decomposed, and its graph.

    The result computes the same function (for inputs of these shapes and, where
    the model branches on values, these values) with other operators.
    """
    state_names = [*target.parameters, *target.buffers]
    graph = make_fx(
        _flat(target, len(inputs)),
        decomposition_table=decompositions_for(names),
        tracing_mode="real",
    )(*inputs, *_state_values(target))

    def fn(args: Tensors, state: dict[str, torch.Tensor]) -> Tensors:
        return tuple(graph(*args, *(state[k] for k in state_names)))

    return Materialized(fn=fn, parameters=target.parameters, buffers=target.buffers), graph


def _refuse_uncovered(
    graph: torch.fx.GraphModule, carrying: list[int], what: str, *, forward: bool = False
) -> None:
    """Raise `_Uncovered` when the graph drops a tangent (NOTE [derivative coverage check]);
    ``forward``: forward AD runs it."""
    gap = first_uncovered(graph.graph, carrying, forward=forward)
    if gap is not None:
        raise _Uncovered(gap, what)


def _refuse_other_values(target: Materialized, inputs: Tensors, outputs: Tensors) -> None:
    """Raise `_Uncovered` unless the decomposition computes the kernels' values.

    A decomposition is another program for the same function, and PyTorch's are
    not all faithful: in 2.13 ``multilabel_margin_loss_forward``'s counts the
    labels after a target row's ``-1``. Its derivative is then the derivative of
    another function. One run of the original (no AD) is the reference. The
    tolerance is loose (the square root of the dtype's epsilon, relative to the
    output's largest entry): kernels round differently (``cdist`` on many rows
    computes ``|x|**2 + |y|**2 - 2 x.y``), while an unfaithful decomposition is
    off by the order of the values themselves.
    """
    with torch.no_grad():
        want = tuple(target.fn(inputs, {**target.parameters, **target.buffers}))
    for i, (got, ref) in enumerate(zip(outputs, want, strict=True)):
        try:
            if ref.is_floating_point() and ref.numel():
                tol = torch.finfo(ref.dtype).eps ** 0.5
                scale = float(ref.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())
                torch.testing.assert_close(
                    got, ref, rtol=tol, atol=tol * scale, equal_nan=True, check_dtype=False
                )
            else:
                torch.testing.assert_close(got, ref, equal_nan=True)
        except AssertionError:
            gap = NotCovered("the decomposition", f"its output {i} differs from the kernel's")
            raise _Uncovered(gap, "the decomposition") from None


class _Uncovered(Exception):
    """A fallback's graph runs an operator without a derivative for a tangent it gets."""

    def __init__(self, gap: NotCovered, what: str) -> None:
        super().__init__(f"{what} runs {gap}")
        self.gap = gap


def check_double_vjp(
    target: Materialized,
    inputs: Tensors,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
) -> None:
    """Refuse (`_Uncovered`) unless both passes of `jvp_double_vjp` carry every tangent.

    Checks the function's graph (each argument with a tangent needs a backward
    formula) and the traced first pass ``u -> J^T u`` (each operator the
    cotangents ``u`` reach needs a formula for them), per NOTE [derivative
    coverage check].
    """
    n = len(inputs)
    carrying = _carrying(target, tangents, parameter_tangents)
    args = [*inputs, *_state_values(target)]
    forward = make_fx(_flat(target, n), tracing_mode="real")(*args)
    _refuse_uncovered(forward, carrying, "the function")
    outputs = forward(*args)
    live = [i for i, o in enumerate(outputs) if _differentiable(o)]
    if not live:
        return
    flat = _flat(target, n)

    def first_pass(*us_and_args: torch.Tensor) -> Tensors:
        us, rest = us_and_args[: len(live)], list(us_and_args[len(live) :])
        with torch.enable_grad():
            for i in carrying:
                rest[i] = rest[i].detach().requires_grad_()
            outs = flat(*rest)
            grads = torch.autograd.grad(
                [outs[i] for i in live],
                [rest[i] for i in carrying],
                list(us),
                create_graph=True,
                allow_unused=True,
            )
        return tuple(g for g in grads if g is not None)

    us = [torch.zeros_like(outputs[i]) for i in live]
    backward = make_fx(first_pass, tracing_mode="real")(*us, *args)
    _refuse_uncovered(backward, list(range(len(live))), "the first backward pass")


def _differentiable(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def jvp_double_vjp(
    target: Materialized,
    inputs: Tensors,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
) -> tuple[Tensors, Tensors]:
    """J·v by reverse mode twice: ``J v = d/du <J^T u, v>`` (any ``u``; zeros here).

    Same arguments and results as `app.engine.jvp.jvp_dual`; needs no dual level.
    """
    with torch.enable_grad():
        xs = [
            x if t is None else x.detach().requires_grad_()
            for x, t in zip(inputs, tangents, strict=True)
        ]
        diff_params = {
            k: target.parameters[k].detach().requires_grad_() for k in parameter_tangents
        }
        state = {**target.parameters, **diff_params, **target.buffers}
        outputs = target.fn(tuple(xs), state)
        leaves = [x for x, t in zip(xs, tangents, strict=True) if t is not None]
        directions = [t for t in tangents if t is not None]
        leaves += list(diff_params.values())
        directions += [parameter_tangents[k] for k in diff_params]
        jvps = [torch.zeros_like(o) for o in outputs]
        live = [i for i, o in enumerate(outputs) if o.requires_grad]
        if leaves and live:
            us = [torch.zeros_like(outputs[i], requires_grad=True) for i in live]
            grads = torch.autograd.grad(
                [outputs[i] for i in live], leaves, us, create_graph=True, allow_unused=True
            )
            pairs = [(g, v) for g, v in zip(grads, directions, strict=True) if g is not None]
            pairs = [(g, v) for g, v in pairs if g.requires_grad]
            if pairs:
                jv = torch.autograd.grad(
                    [g for g, _ in pairs], us, [v for _, v in pairs], allow_unused=True
                )
                for i, j in zip(live, jv, strict=True):
                    if j is not None:
                        jvps[i] = j.detach()
    return tuple(o.detach() for o in outputs), tuple(jvps)


# A long function on purpose (NOTE [one module: the fallbacks]): one ladder of methods,
# each with the reason it was passed over, read in the order it runs.
def jvp_with_fallback(
    engine: JVPFunction,
    target: Materialized,
    inputs: Tensors,
    tangents: tuple[torch.Tensor | None, ...],
    parameter_tangents: Mapping[str, torch.Tensor],
    *,
    fallback: str = "auto",
) -> tuple[Tensors, Tensors, str]:
    """``engine``'s JVP, falling back as NOTE [forward-AD fallback] says.

    Returns ``(outputs, jvps, method)``. Errors other than a missing forward-AD
    formula propagate unchanged (the caller maps them).
    """
    try:
        return (*engine(target, inputs, tangents, parameter_tangents), FORWARD)
    except (RuntimeError, NotImplementedError) as e:
        if not _is_forward_ad_gap(e):
            raise
        first = e
    operator = unsupported_operator(first) or "a custom autograd.Function without jvp()"
    version = torch.__version__
    if fallback == "none":
        raise ForwardADUnsupported(
            f"Operator {operator} has no forward-AD formula in PyTorch {version}, and "
            "options.fallback is 'none' (with 'auto' the service tries a decomposition, "
            "then reverse-over-reverse)"
        ) from None

    if operator not in FALLBACK_OPERATORS and unsupported_operator(first) is not None:
        raise ForwardADUnsupported(
            f"Operator {operator} has no forward-AD formula in PyTorch {version}, and no "
            "fallback is tested for it in this service (the README lists those that are)"
        ) from None

    why_not: list[str] = []
    # 1. Decompose the operators forward AD stops at, one round per operator.
    names: set[str] = set()
    missing = unsupported_operator(first)
    for _ in range(_MAX_ROUNDS):
        if missing is None or missing in names or not decompositions_for({missing}):
            if missing is not None:
                why_not.append(f"no decomposition of {missing} has a forward-AD formula")
            break
        names.add(missing)
        try:
            traced, graph = decompose(target, inputs, names)
            carrying = _carrying(target, tangents, parameter_tangents)
            _refuse_uncovered(graph, carrying, "the decomposition", forward=True)
            result = engine(traced, inputs, tangents, parameter_tangents)
            _refuse_other_values(target, inputs, result[0])
        except torch.OutOfMemoryError:
            raise
        except _Uncovered as e:
            why_not.append(f"{e}, which would drop the tangent")
            break
        except (RuntimeError, NotImplementedError) as e:
            missing = unsupported_operator(e)
            if missing is None:
                why_not.append(f"the decomposed program failed: {first_line(e, 300)}")
                break
            continue
        except Exception as e:  # noqa: BLE001 - a decomposition that cannot trace this model
            why_not.append(f"decomposing {sorted(names)} failed: {first_line(e, 300)}")
            break
        return (*result, DECOMPOSED)

    # 2. Reverse mode twice.
    try:
        check_double_vjp(target, inputs, tangents, parameter_tangents)
        result = jvp_double_vjp(target, inputs, tangents, parameter_tangents)
    except torch.OutOfMemoryError:
        raise
    except _Uncovered as e:
        why_not.append(f"reverse-over-reverse: {e}, which would drop the tangent")
    except (RuntimeError, NotImplementedError) as e:
        why_not.append(f"reverse-over-reverse failed: {first_line(e, 300)}")
    except Exception as e:  # noqa: BLE001 - a program the check cannot trace is not proven
        why_not.append(f"reverse-over-reverse could not be checked: {first_line(e, 300)}")
    else:
        return (*result, DOUBLE_VJP)

    raise ForwardADUnsupported(
        f"Operator {operator} has no forward-AD formula in PyTorch {version}; "
        f"the fallbacks failed too: {'; '.join(why_not)}"
    ) from None
