"""Property tests of the expression compiler over random syntax trees.

Random ASTs over the whole Python expression grammar (calls, attributes,
subscripts, lambdas, comprehensions, f-strings, starred, walrus, comparisons,
boolean operators, conditionals, displays, await, yield, every operator),
unparsed to text, are either

* rejected with InvalidExpression (400) or TooLarge (413), and nothing else; or
* compiled to a function that, run on real tensors with ``__import__``,
  ``open``, ``eval``, ``exec`` and ``compile`` made to raise, calls only torch
  functions in an allow-set derived from ``ALLOWED_FUNCTIONS``' impls and the
  operators (recorded with a ``TorchFunctionMode``).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from app.engine.errors import InvalidExpression, TooLarge
from app.engine.expressions import ALLOWED_FUNCTIONS, FunctionSpec, compile_expression

aten = torch.ops.aten

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Recorder(TorchFunctionMode):
    """Records every torch function (and Tensor method) called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.called: set[Any] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        self.called.add(func)
        return func(*args, **(kwargs or {}))


def _forbidden(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the compiled expression called {name}")

    return refuse


def _import_of_torch_only(real: Callable[..., Any]) -> Callable[..., Any]:
    # Under a TorchFunctionMode (the Recorder), PyTorch's C++ dispatch of an aten
    # overload (NOTE [literal operands]) looks up ``torch`` with PyImport: already
    # loaded, it loads no code. Any other import is refused.
    def guarded(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torch" and not (args[2:3] and args[2]):
            return real(name, *args, **kwargs)
        raise AssertionError(f"the compiled expression called __import__ ({name!r})")

    return guarded


@contextlib.contextmanager
def no_escape_hatches() -> Iterator[None]:
    """__import__ (but of torch itself, already loaded), open, eval, exec and compile
    raise while the expression runs."""
    names = ("__import__", "open", "eval", "exec", "compile")
    saved = {n: getattr(builtins, n) for n in names}
    try:
        for n in names:
            setattr(builtins, n, _forbidden(n))
        builtins.__import__ = _import_of_torch_only(saved["__import__"])
        yield
    finally:
        for n, f in saved.items():
            setattr(builtins, n, f)


def sample_args(spec: FunctionSpec) -> list[tuple[torch.Tensor, ...]]:
    x = torch.rand(3, 3, dtype=torch.float64) + 0.5
    v = torch.rand(3, dtype=torch.float64) + 0.5
    if spec.n_tensors == 1 and spec.int_kind == "shape":
        return [(x, 9), (x, 3, -1)]
    if spec.n_tensors == 1:
        ints = [(), (0,), (0, 1)][spec.n_ints[0] : spec.n_ints[1] + 1]
        return [(x, *i) for i in ints]
    if spec.signature.startswith("dot"):
        return [(v, v)]
    return [tuple([x] * spec.n_tensors)]


def derive_allowed() -> set[Any]:
    """Every torch function the allowed impls and the operators call, found by running them."""
    recorder = Recorder()
    x = torch.rand(3, 3, dtype=torch.float64) + 0.5
    with recorder:
        for spec in ALLOWED_FUNCTIONS.values():
            for args in sample_args(spec):
                spec.impl(*args)
        for op in (torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.remainder):
            op(x, x)
        # A literal beside a tensor (NOTE [literal operands] in app/engine/expressions.py)
        for overload in (aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar):
            overload(x, 2.0)
        aten.mul.Scalar(x, 2.0)
        aten.div.Scalar(x, 2.0)
        torch.reciprocal(x)
        torch.matmul(x, x)
        torch.neg(x)
    return recorder.called


ALLOWED = derive_allowed()

# --- random expressions over the whole grammar -----------------------------------------------

NAMES = [
    "x", "y", "sin", "exp", "sum", "reshape", "pi", "e", "__import__", "open", "eval",
    "exec", "getattr", "print", "_x", "__builtins__", "torch", "os", "self", "None", "True",
]  # fmt: skip
ATTRS = ["__class__", "__globals__", "__subclasses__", "T", "real", "sum", "gi_frame", "data"]
CONSTS = st.one_of(
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "os", "{0.__class__}"]),
    st.just(b"x"),
    st.none(),
    st.booleans(),
    st.just(...),
    st.complex_numbers(max_magnitude=1e3, allow_nan=False),
)
BINOPS = [
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod, ast.MatMult, ast.FloorDiv,
    ast.LShift, ast.RShift, ast.BitOr, ast.BitXor, ast.BitAnd,
]  # fmt: skip
UNARY = [ast.USub, ast.UAdd, ast.Not, ast.Invert]
CMPOPS = [ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn]


def name(id_: str) -> ast.Name:
    return ast.Name(id=id_, ctx=ast.Load())


def store(id_: str) -> ast.Name:
    return ast.Name(id=id_, ctx=ast.Store())


def comprehension(target: str, it: ast.expr, cond: list[ast.expr]) -> ast.comprehension:
    return ast.comprehension(target=store(target), iter=it, ifs=cond, is_async=0)


def extend(children: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    c = children
    lists = st.lists(c, min_size=0, max_size=3)
    ident = st.sampled_from(["x", "y", "z"])
    fn = st.sampled_from(sorted(ALLOWED_FUNCTIONS) + ["getattr", "eval", "open", "print"])
    return st.one_of(
        st.builds(lambda a, op, b: ast.BinOp(a, op(), b), c, st.sampled_from(BINOPS), c),
        st.builds(lambda op, a: ast.UnaryOp(op(), a), st.sampled_from(UNARY), c),
        st.builds(lambda f, args: ast.Call(name(f), args, []), fn, lists),
        st.builds(lambda f, args: ast.Call(f, args, []), c, lists),
        st.builds(
            lambda f, a, k, v: ast.Call(name(f), [a], [ast.keyword(arg=k, value=v)]),
            fn,
            c,
            st.sampled_from(["dim", None]),
            c,
        ),
        st.builds(lambda f, a: ast.Call(name(f), [ast.Starred(a, ast.Load())], []), fn, c),
        st.builds(lambda v, a: ast.Attribute(v, a, ast.Load()), c, st.sampled_from(ATTRS)),
        st.builds(lambda v, s: ast.Subscript(v, s, ast.Load()), c, c),
        st.builds(lambda v, lo, hi: ast.Subscript(v, ast.Slice(lo, hi, None), ast.Load()), c, c, c),
        st.builds(
            lambda arg, body: ast.Lambda(
                ast.arguments([], [ast.arg(arg)], None, [], [], None, []), body
            ),
            ident,
            c,
        ),
        st.builds(lambda t, e, it: ast.ListComp(e, [comprehension(t, it, [])]), ident, c, c),
        st.builds(lambda t, e, it: ast.SetComp(e, [comprehension(t, it, [])]), ident, c, c),
        st.builds(
            lambda t, e, it, cond: ast.GeneratorExp(e, [comprehension(t, it, [cond])]),
            ident,
            c,
            c,
            c,
        ),
        st.builds(
            lambda t, k, v, it: ast.DictComp(k, v, [comprehension(t, it, [])]), ident, c, c, c
        ),
        st.builds(lambda v: ast.JoinedStr([ast.Constant("a"), ast.FormattedValue(v, -1, None)]), c),
        st.builds(lambda t, v: ast.NamedExpr(store(t), v), ident, c),
        st.builds(lambda a, ops, b: ast.Compare(a, [ops()], [b]), c, st.sampled_from(CMPOPS), c),
        st.builds(
            lambda op, vs: ast.BoolOp(op(), vs),
            st.sampled_from([ast.And, ast.Or]),
            st.lists(c, min_size=2, max_size=3),
        ),
        st.builds(ast.IfExp, c, c, c),
        st.builds(lambda ks, vs: ast.Dict(ks, vs[: len(ks)] + ks[len(vs) :]), lists, lists),
        st.builds(lambda xs: ast.Set(xs or [name("x")]), lists),
        st.builds(lambda xs: ast.List(xs, ast.Load()), lists),
        st.builds(lambda xs: ast.Tuple(xs, ast.Load()), lists),
        st.builds(lambda xs: ast.List([ast.Starred(x, ast.Load()) for x in xs], ast.Load()), lists),
        st.builds(ast.Await, c),
        st.builds(ast.Yield, c),
        st.builds(ast.YieldFrom, c),
    )


LEAVES = st.one_of(st.sampled_from(NAMES).map(name), CONSTS.map(ast.Constant))
ANY_EXPR = st.recursive(LEAVES, extend, max_leaves=12)


def in_language(children: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    """Only constructs of the language, with the right arities: these must compile."""
    c = children
    ops = [ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Mod]
    unary_fns = [n for n, s in ALLOWED_FUNCTIONS.items() if s.n_tensors == 1 and s.n_ints[1] == 0]
    binary_fns = [n for n, s in ALLOWED_FUNCTIONS.items() if s.n_tensors == 2 and n != "dot"]
    dim_fns = [n for n, s in ALLOWED_FUNCTIONS.items() if s.int_kind == "dim" and s.n_ints[1] == 1]
    return st.one_of(
        st.builds(lambda a, op, b: ast.BinOp(a, op(), b), c, st.sampled_from(ops), c),
        st.builds(lambda a: ast.UnaryOp(ast.USub(), a), c),
        st.builds(lambda f, a: ast.Call(name(f), [a], []), st.sampled_from(unary_fns), c),
        st.builds(lambda f, a, b: ast.Call(name(f), [a, b], []), st.sampled_from(binary_fns), c, c),
        st.builds(
            lambda f, a, d: ast.Call(name(f), [a, ast.Constant(d)], []),
            st.sampled_from(dim_fns),
            c,
            st.integers(0, 1),
        ),
        st.builds(
            lambda a: ast.Call(name("clamp"), [a, ast.Constant(0.1), ast.Constant(2)], []), c
        ),
        st.builds(
            lambda a: ast.Call(name("transpose"), [a, ast.Constant(0), ast.Constant(1)], []), c
        ),
        st.builds(lambda a, b: ast.BinOp(a, ast.MatMult(), b), c, c),
    )


LANGUAGE_LEAVES = st.one_of(
    st.sampled_from(["x", "y", "pi", "e"]).map(name),
    st.floats(0.1, 3.0).map(ast.Constant),
    st.integers(0, 5).map(ast.Constant),
)
LANGUAGE_EXPR = st.recursive(LANGUAGE_LEAVES, in_language, max_leaves=10)


def unparse(node: ast.expr) -> str:
    tree = ast.fix_missing_locations(ast.Expression(body=node))
    try:
        return ast.unparse(tree)
    except Exception:  # noqa: BLE001 - a tree ast.unparse cannot write is no test case
        assume(False)
        raise


def compile_or_reject(source: str) -> Any:
    try:
        return compile_expression(source, max_length=4000, max_nodes=400, max_depth=60)
    except (InvalidExpression, TooLarge):
        return None


def run_recorded(compiled: Any) -> set[Any]:
    fn = compiled.bind(torch.float64, torch.device("cpu"))
    args = [torch.rand(3, 3, dtype=torch.float64) + 0.5 for _ in compiled.variables]
    recorder = Recorder()
    with no_escape_hatches(), recorder:
        try:
            fn(*args)
        except (RuntimeError, ValueError, IndexError):
            pass  # shapes that do not fit (a 422 from the service), still only allowed calls
    return recorder.called


@FUZZ
@given(ANY_EXPR)
def test_compile_expression_any_tree_is_rejected_or_calls_only_allowed(node: ast.expr) -> None:
    source = unparse(node)
    compiled = compile_or_reject(source)  # anything but InvalidExpression/TooLarge fails here
    if compiled is None:
        return
    called = run_recorded(compiled)
    assert called <= ALLOWED, {torch.overrides.resolve_name(f) for f in called - ALLOWED}


@FUZZ
@given(LANGUAGE_EXPR)
def test_compile_expression_language_tree_compiles_and_calls_only_allowed(
    node: ast.expr,
) -> None:
    source = unparse(node)
    compiled = compile_expression(source, max_length=4000, max_nodes=400, max_depth=60)
    called = run_recorded(compiled)
    assert called <= ALLOWED, {torch.overrides.resolve_name(f) for f in called - ALLOWED}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ANY_EXPR)
def test_create_jvp_any_tree_answers_200_or_4xx(client: TestClient, node: ast.expr) -> None:
    source = unparse(node)
    r = client.post(
        "/jvp",
        json={"expression": source, "primals": {"x": [[1.0, 2.0], [3.0, 4.0]], "y": 0.5}},
    )
    assert r.status_code in (200, 400, 413, 422), (source, r.text)
    if r.status_code in (400, 413):
        assert r.json()["error"]["type"] in ("invalid_expression", "too_large")


def test_allowed_set_holds_impls_and_operators_only() -> None:
    names = {torch.overrides.resolve_name(f) or repr(f) for f in ALLOWED}
    assert "torch.sin" in names and "torch.matmul" in names
    assert not any("eval" in n or "import" in n or "open" in n for n in names)


@pytest.mark.parametrize("source", ["sin(x) @ y + sum(x, 0)", "reshape(x, 9) * 2"])
def test_recorder_sees_calls_of_compiled_expression(source: str) -> None:
    called = run_recorded(compile_expression(source))
    assert called and called <= ALLOWED
