"""Property: for random expressions of the language at random points (edge values included), a
JVP with a tangent on only some inputs equals `torch.func.jvp`, in float64, of the function of
those inputs alone, the others closed over as constants (NOTE [mixed dual and plain operands]).

The reference function is built from the generated tree here, with torch directly (not through
the expression compiler); NaN is accepted only where the reference is NaN too. Both engines, at
3 elements (zero tangents, verified) and at 70,002 (operands plain), through `compute` (the
worker's own path: engine, fallback wrapper, error mapping).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Union

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.engine import functions
from app.engine.compute import compute
from app.engine.jvp import ZERO_DUAL_MAX_ELEMENTS
from app.engine.task import JVPTask
from app.services.jvp import expression_target

F64 = torch.float64
CPU = torch.device("cpu")
VARIABLES = ("x", "y", "z")
LARGE = 70_002  # a multiple of the 3 points, above ZERO_DUAL_MAX_ELEMENTS
assert LARGE > ZERO_DUAL_MAX_ELEMENTS

Node = Union[str, tuple]  # noqa: UP007 - a recursive alias
Fn = Callable[[dict[str, torch.Tensor]], torch.Tensor]

UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "asin": torch.asin,
    "acosh": torch.acosh,
    "atan": torch.atan,
    "abs": torch.abs,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "erf": torch.erf,
    "log1p": torch.log1p,
    "rsqrt": torch.rsqrt,
}
# The language's own accurate forms (NOTE [accurate elementwise functions], tested against
# mpmath in test_accuracy.py), so that this test compares only what an input without a
# tangent contributes, not torch's formulas where they overflow or cancel.
UNARY.update({name: fn for name, fn in functions.ACCURATE.items() if name in UNARY})
BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "+": torch.add,
    "-": torch.sub,
    "*": torch.mul,
    "/": torch.div,
    "**": torch.pow,
    "atan2": functions.atan2,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}
EXPONENTS = (2.0, 3.0, 0.5, -1.0)
# Edge values (where a partial derivative is infinite or undefined) twice as often as the rest.
EDGES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-300, 1e300, math.inf, -math.inf])
POINTS = st.one_of(EDGES, EDGES, st.floats(-4.0, 4.0, allow_nan=False))


def _extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.one_of(
        st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY)), children),
        st.tuples(st.just("binary"), st.sampled_from(sorted(BINARY)), children, children),
        st.tuples(st.just("power"), children, st.sampled_from(EXPONENTS)),
        st.tuples(st.just("scale"), children, st.sampled_from([2.0, -0.5])),
    )


TREES = st.recursive(st.sampled_from(VARIABLES), _extend, max_leaves=6)


def _source(node: Node) -> str:
    if isinstance(node, str):
        return node
    kind = node[0]
    if kind == "unary":
        return f"{node[1]}({_source(node[2])})"
    if kind == "binary":
        op, a, b = node[1], _source(node[2]), _source(node[3])
        return f"{op}({a}, {b})" if op[0].isalpha() else f"({a} {op} {b})"
    if kind == "power":
        return f"({_source(node[1])} ** {node[2]!r})"
    return f"({node[2]!r} * {_source(node[1])})"


def _function(node: Node) -> Fn:
    if isinstance(node, str):
        name = node
        return lambda env: env[name]
    kind = node[0]
    if kind == "unary":
        op, arg = UNARY[node[1]], _function(node[2])
        return lambda env: op(arg(env))
    if kind == "binary":
        bop, a, b = BINARY[node[1]], _function(node[2]), _function(node[3])
        return lambda env: bop(a(env), b(env))
    if kind == "power":
        base, exponent = _function(node[1]), node[2]
        return lambda env: torch.pow(base(env), exponent)
    inner, factor = _function(node[1]), node[2]
    return lambda env: factor * inner(env)


def _reference(
    fn: Fn,
    names: tuple[str, ...],
    inputs: dict[str, torch.Tensor],
    tangents: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    free = [n for n in names if n in tangents]
    if not free:
        with torch.no_grad():
            out = fn(inputs)
        return out, torch.zeros_like(out)

    def closed(*args: torch.Tensor) -> torch.Tensor:
        return fn({**inputs, **dict(zip(free, args, strict=True))})

    out, jvp = torch.func.jvp(
        closed, tuple(inputs[n] for n in free), tuple(tangents[n] for n in free)
    )
    return out, jvp


@settings(
    max_examples=120,
    deadline=None,
    derandomize=False,  # new points every run; the reproducers above run every time
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    tree=TREES,
    points=st.lists(st.lists(POINTS, min_size=3, max_size=3), min_size=3, max_size=3),
    with_tangent=st.lists(st.booleans(), min_size=3, max_size=3),
    directions=st.lists(st.floats(-3.0, 3.0, allow_nan=False), min_size=3, max_size=3),
)
# The reproducers (issue 14), then random ones.
@example(
    ("binary", "**", "x", "y"), [[-1.0] * 3, [2.0] * 3, [0.0] * 3], [True, False, False], [1.0] * 3
)
@example(
    ("binary", "+", ("unary", "sqrt", "x"), "y"),
    [[0.0] * 3, [1.0] * 3, [0.0] * 3],
    [False, True, False],
    [1.0] * 3,
)
@example(
    ("binary", "**", "x", "y"), [[0.0] * 3, [0.5] * 3, [0.0] * 3], [False, True, False], [1.0] * 3
)
@example(
    ("binary", "+", ("unary", "asin", "x"), "y"),
    [[1.0] * 3, [1.0] * 3, [0.0] * 3],
    [False, True, False],
    [1.0] * 3,
)
@example(
    ("unary", "sqrt", "x"), [[0.0] * 3, [0.0] * 3, [0.0] * 3], [False, False, False], [1.0] * 3
)
def test_jvp_with_tangents_on_some_inputs_matches_the_closed_over_function(
    tree: Node, points: list[list[float]], with_tangent: list[bool], directions: list[float]
) -> None:
    source = _source(tree)
    target = expression_target(source, 2000, 500, 50)
    names = target.input_names  # the variables that occur, sorted
    fn = _function(tree)
    base = {n: torch.tensor(points[VARIABLES.index(n)], dtype=F64) for n in names}
    given_names = [n for n in names if with_tangent[VARIABLES.index(n)]]
    for size in (3, LARGE):
        inputs = {n: v.repeat(size // 3) for n, v in base.items()}
        tangents = {
            n: torch.full((size,), directions[VARIABLES.index(n)], dtype=F64) for n in given_names
        }
        want_out, want_jvp = _reference(fn, names, inputs, tangents)
        for engine in ("dual", "functional"):
            task = JVPTask(
                target,
                tuple(inputs[n] for n in names),
                tuple(tangents.get(n) for n in names),
                {},
                F64,
                CPU,
                engine=engine,
            )
            outputs, jvps, _ = compute(task)
            where = f"{source} at {points}, tangents {tangents and given_names}, {engine}, {size}"
            torch.testing.assert_close(outputs[0], want_out, equal_nan=True, msg=where)
            torch.testing.assert_close(
                jvps[0], want_jvp, rtol=1e-12, atol=1e-300, equal_nan=True, msg=where
            )
