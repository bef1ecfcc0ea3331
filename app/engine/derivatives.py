"""Which operator carries a derivative for which argument: a check of traced graphs.

# NOTE [derivative coverage check]
A fallback (NOTE [forward-AD fallback] in app/engine/fallback.py) runs operators
that plain forward AD never reached, and some of them drop a tangent without an
error: a decomposition may end in a ``prims`` operator (``igamma`` becomes
``prims.igamma``), whose autograd kernel runs the operator below autograd and
returns a result with no tangent; an argument that PyTorch marks
``non_differentiable`` contributes nothing, silently. The JVP is then a number
(often zero) that is wrong.

So before a fallback answers, the graph it runs (traced with `make_fx`, the
operators exactly as they will run) is checked statically: a tangent is
followed from the inputs that carry one through every node, and every node that
receives a tangent in some argument must carry a derivative for that argument.
What "carries a derivative" means comes from PyTorch's own ``derivatives.yaml``,
shipped with torch (``torchgen/packaged/autograd``) and read once: it is the
file the autograd kernels of this very build were generated from, so it says
exactly which (operator, argument) pairs have a formula. An argument is covered
when a formula names it and the formula is not ``non_differentiable`` and not
``not_implemented(...)``; an output listed ``False`` in
``output_differentiability`` carries no tangent, so a later use of it (a float
output) is refused. Anything else is refused: operators outside ``aten``
(``prims``, custom ops), aten operators with no entry (their autograd kernel is
hand-written or absent), arguments no formula names. The only exceptions are
the few operators in `_EXACT_WITHOUT_ENTRY`, checked by hand, and those in
`_VALUE_INDEPENDENT` (``ones_like`` and kin), whose result does not depend on
the values of their argument at all.

Why static and not a run-time test ("an output lost its tangent"): a run-time
test sees only whether *some* tangent reached an output, so an operator whose
second argument is non-differentiable while the first carries a tangent passes
it; and it needs a dual level, which the ``functional`` engine and the
double-VJP do not have. The static check decides per argument, for every
method, before anything runs, and refuses what it cannot prove. Formulas that
are zero (``floor``, ``sign``, comparisons) are accepted: zero is the exact
derivative of a piecewise-constant function where it exists.

The double-VJP needs more: its first pass runs backward formulas with
``create_graph=True`` and its second pass differentiates *those* in the
cotangent. So it checks two graphs: the function (every argument with a tangent
needs a backward formula) and the traced first backward pass ``u -> J^T u``
(every node the cotangent reaches needs a formula for it).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchgen
import yaml
from torch import fx

__all__ = ["ArgumentCoverage", "NotCovered", "coverage", "first_uncovered"]

_YAML = Path(torchgen.__file__).parent / "packaged" / "autograd" / "derivatives.yaml"
_NOT_ARGUMENTS = {"name", "dispatch", "output_differentiability"}
_RESULT = re.compile(r"^result\d*$")

# Operators with no derivatives.yaml entry whose autograd behaviour is exact
# (hand-written kernels in VariableTypeManual.cpp), with why.
_EXACT_WITHOUT_ENTRY: dict[str, str] = {
    # A stop-gradient by definition: the program says "treat this as a constant",
    # and plain forward AD on the same program drops the tangent there too.
    "detach": "a stop-gradient, as in plain forward AD",
    # Writes ``src`` into ``self``: the derivative is ``src``'s tangent (broadcast and
    # cast), ``self``'s old value is overwritten. Both modes are hand-written for it
    # (``copy_`` in VariableTypeManual.cpp sets the forward grad; CopyBackwards).
    "copy_": "the tangent of what it copies, as written by hand in PyTorch",
}

# Operators whose result is a Python number, not a tensor: a value that reaches one
# with a tangent leaves autograd there (``x * x[0].item()`` differentiates only the
# first ``x``; ``torch.tensor(x.tolist())`` is a constant). Nothing marks that as
# meant, as ``detach`` does, so it is refused.
_ESCAPES = frozenset({"_local_scalar_dense", "item"})
_ESCAPE_REASON = (
    "its value leaves the tensor as a Python number (item(), tolist(), float()), which "
    "carries no derivative; detach() first where a constant is meant"
)


# Forward-AD formulas that return no tangent where the derivative is not zero, though
# derivatives.yaml lists one (found by comparing forward AD with float64 central
# differences over the samples of PyTorch 2.13's OpInfo database): operator ->
# (the arguments that select the broken case, why). Reverse mode is right for them.
_FORWARD_DROPS: dict[str, tuple[dict[str, object], str]] = {
    # scatter_reduce_jvp has no branch for "prod": no tangent comes out at all.
    "scatter_reduce": ({"reduce": "prod"}, "its forward-AD formula gives no tangent for 'prod'"),
}


def forward_drop(target: Any, arguments: dict[str, Any]) -> NotCovered | None:
    """The gap of an operator whose forward-AD formula drops the tangent for these
    ``arguments`` (by name) though derivatives.yaml lists one, else None."""
    found = _FORWARD_DROPS.get((_base_name(target) or "").removesuffix("_"))  # and in place
    if found is None or any(arguments.get(k) != v for k, v in found[0].items()):
        return None
    return NotCovered(_name(target), found[1])


def output_flags(
    op: torch._ops.OpOverload, entry: ArgumentCoverage | None, forward: bool
) -> tuple[bool, ...] | None:
    """Which outputs of ``op`` carry a derivative (None: all). In forward mode also: where
    derivatives.yaml gives some outputs a forward formula (``result0: layer_norm_jvp``)
    and none for the others (``native_layer_norm``'s mean and rstd), forward AD gives
    those no tangent (an entry naming its outputs, ``U, S, Vh: ...``, covers them all)."""
    if entry is None:
        return None
    flags = entry.differentiable_outputs
    given = entry.forward_outputs
    returns = op._schema.returns
    if not forward or given is None or len(returns) < 2:
        return flags
    if any(r.name and r.name in entry.arguments for r in returns):
        return flags
    return tuple(
        i in given and (flags is None or i >= len(flags) or flags[i]) for i in range(len(returns))
    )


def escapes(target: Any) -> NotCovered | None:
    """The gap of an operator that turns a live float tensor into a Python number, else
    None (the caller knows the tensor is live and a float)."""
    if _base_name(target) in _ESCAPES:
        return NotCovered(_name(target), _ESCAPE_REASON)
    return None


# Operators whose result depends on their tensor argument's shape, dtype and
# device only, never on its values: a zero derivative is exact, no tangent flows.
_VALUE_INDEPENDENT = frozenset(
    {
        "ones_like", "zeros_like", "empty_like", "full_like", "rand_like", "randn_like",
        "randint_like", "new_ones", "new_zeros", "new_empty", "new_full", "new_empty_strided",
    }
)  # fmt: skip
# What carries no tangent out, whatever comes in: the value-independent operators, and
# the stop-gradient (`_EXACT_WITHOUT_ENTRY`), whose result the program means as a constant.
NO_TANGENT_OUT = _VALUE_INDEPENDENT | {"detach"}


@dataclass(frozen=True)
class NotCovered:
    """The first node of a graph that would drop a tangent: operator and why."""

    operator: str
    reason: str

    def __str__(self) -> str:
        return f"{self.operator}: {self.reason}"


@dataclass(frozen=True)
class ArgumentCoverage:
    """One derivatives.yaml entry: argument -> whether it has a real formula."""

    arguments: dict[str, bool]
    differentiable_outputs: tuple[bool, ...] | None  # None: all
    # Outputs with a forward-AD formula of their own (``result1: ...``); None: none listed.
    forward_outputs: frozenset[int] | None = None


def _formula_is_real(formula: str) -> bool:
    return formula.strip() != "non_differentiable" and "not_implemented" not in formula


@functools.cache
def _table() -> dict[tuple[str, str], ArgumentCoverage]:
    with _YAML.open() as f:
        entries = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    table: dict[tuple[str, str], ArgumentCoverage] = {}
    for entry in entries:
        name = entry["name"].split("(", 1)[0]
        base, _, overload = name.partition(".")
        body = entry.get("dispatch", {}).get("Default", entry)
        arguments: dict[str, bool] = {}
        results: set[int] = set()
        for key, formula in body.items():
            if _RESULT.match(key):
                results.add(int(key[len("result") :] or 0))
            if key in _NOT_ARGUMENTS or _RESULT.match(key):
                continue
            for arg in key.split(","):
                arguments[arg.strip()] = _formula_is_real(str(formula))
        outputs = entry.get("output_differentiability")
        flags = None
        if outputs is not None:
            flags = tuple(o is not False and o != "False" for o in outputs)
        table[(base, overload)] = ArgumentCoverage(arguments, flags, frozenset(results) or None)
    return table


def coverage(op: torch._ops.OpOverload) -> ArgumentCoverage | None:
    """The derivatives.yaml entry of an aten operator overload, else None."""
    schema = op._schema
    namespace, _, base = schema.name.partition("::")
    if namespace != "aten":
        return None
    table = _table()
    found = table.get((base, schema.overload_name))
    if found is None and base.endswith("_") and not base.endswith("__"):
        # An in-place variant (``tril_``) gets its out-of-place entry's formulas.
        found = table.get((base[:-1], schema.overload_name))
    return found


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (
        value.dtype.is_floating_point or value.dtype.is_complex
    )


def _outputs(node: fx.Node) -> list[Any]:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (tuple, list)) else [val]


def _nodes_in(value: Any) -> Iterator[fx.Node]:
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _nodes_in(v)


def _arguments(node: fx.Node, op: torch._ops.OpOverload) -> Iterator[tuple[str, Any]]:
    for i, arg in enumerate(op._schema.arguments):
        if i < len(node.args):
            yield arg.name, node.args[i]
        elif arg.name in node.kwargs:
            yield arg.name, node.kwargs[arg.name]


# A long function on purpose (61 lines): one walk over the graph, whose state (live and
# dead nodes) the per-node rules share; the rules are helpers (`_check_node`, `escapes`,
# `output_flags`).
def first_uncovered(
    graph: fx.Graph, carrying: Iterable[int], *, forward: bool = False
) -> NotCovered | None:
    """The first node that receives a tangent in an argument it has no derivative for.

    ``carrying``: the positions of the placeholders that carry a tangent. Nodes
    need ``meta["val"]`` (as `make_fx` records), to know which outputs are floats.
    ``forward``: forward AD will run the graph (`forward_drop` applies too).
    """
    start = set(carrying)
    live: set[fx.Node] = set()  # nodes whose value carries a tangent
    dead_floats: dict[fx.Node, str] = {}  # float outputs with no derivative: node -> why
    placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            if placeholders in start:
                live.add(node)
            placeholders += 1
            continue
        if node.op == "output":
            for n in _nodes_in(node.args):
                if n in dead_floats:
                    return NotCovered(_name(n.target), dead_floats[n])
            continue
        if node.op != "call_function":
            continue
        inputs = [n for n in _nodes_in((node.args, node.kwargs))]
        for n in inputs:
            if n in dead_floats:
                return NotCovered(_name(n.target), dead_floats[n])
        if not any(n in live for n in inputs):
            continue
        if node.target is operator.getitem:
            parent, index = node.args[0], node.args[1]
            if parent in live and isinstance(index, int) and _is_float(node.meta.get("val")):
                live.add(node)
            continue
        if any(n in live and _is_float(n.meta.get("val")) for n in inputs) and escapes(node.target):
            return escapes(node.target)
        outputs = _outputs(node)
        if not any(_is_float(v) for v in outputs):
            continue  # integer or boolean results carry no tangent in any mode
        if _base_name(node.target) in NO_TANGENT_OUT:
            continue
        problem = _check_node(node, live, forward)
        if problem is not None:
            return problem
        entry = coverage(node.target) if isinstance(node.target, torch._ops.OpOverload) else None
        flags = output_flags(node.target, entry, forward)
        if flags is not None and len(outputs) > 1:
            for i, (flag, value) in enumerate(zip(flags, outputs, strict=False)):
                if not flag and _is_float(value):
                    # A multi-output node: only its getitem users read output i.
                    for user in node.users:
                        if user.target is operator.getitem and user.args[1] == i:
                            dead_floats[user] = f"output {i} has no derivative"
        elif flags is not None and not any(flags):
            dead_floats[node] = "its output has no derivative"
            continue
        live.add(node)
    return None


def _check_node(node: fx.Node, live: set[fx.Node], forward: bool) -> NotCovered | None:
    target = node.target
    name = _name(target)
    if not isinstance(target, torch._ops.OpOverload):
        return NotCovered(name, "not an aten operator, so its derivative is unknown")
    entry = coverage(target)
    if entry is None:
        if target._schema.name.partition("::")[2] in _EXACT_WITHOUT_ENTRY:
            return None
        namespace = target._schema.name.partition("::")[0]
        if namespace != "aten":
            return NotCovered(name, f"a {namespace} operator, with no derivative formula")
        return NotCovered(name, "PyTorch lists no derivative formula for it")
    for arg, value in _arguments(node, target):
        carries = any(n in live for n in _nodes_in(value))
        if carries and not entry.arguments.get(arg, False):
            return NotCovered(name, f"no derivative for its argument {arg!r}")
    return forward_drop(target, dict(_arguments(node, target))) if forward else None


def _base_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, base = target._schema.name.partition("::")
        return base if namespace == "aten" else None
    return None


def _name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, base = target._schema.name.partition("::")
        return base if namespace == "aten" else f"{namespace}.{base}"
    return getattr(target, "__name__", str(target))
