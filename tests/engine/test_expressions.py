"""The expression compiler: every function's JVP against independent references, and rejections."""

from __future__ import annotations

import ast
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.func import jvp, vmap

from app.engine.errors import EngineError, InvalidExpression, TooLarge
from app.engine.expressions import ALLOWED_FUNCTIONS, ALLOWED_OPERATORS, compile_expression

# torch's forward AD loads its jvp decompositions through the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

F64 = torch.float64
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """An expression, the same function written directly in torch, and its inputs' domains."""

    source: str
    reference: Callable[..., torch.Tensor]  # takes the variables as keyword arguments
    domains: dict[str, tuple[tuple[int, ...], float, float]]  # name -> (shape, low, high)

    def inputs(self, salt: str = "") -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(zlib.crc32((self.source + salt).encode()))
        return {
            name: low + (high - low) * torch.rand(shape, dtype=F64, generator=generator)
            for name, (shape, low, high) in sorted(self.domains.items())
        }


def _x(low: float = -3.0, high: float = 3.0, shape: tuple[int, ...] = (5,)):
    return {"x": (shape, low, high)}


M = (3, 4)
AB = ((5,), -1.0, 1.0)
CASES = [
    Case("sin(x)", lambda x: torch.sin(x), _x()),
    Case("cos(x)", lambda x: torch.cos(x), _x()),
    Case("tan(x)", lambda x: torch.tan(x), _x(-1.2, 1.2)),
    Case("asin(x)", lambda x: torch.asin(x), _x(-0.9, 0.9)),
    Case("acos(x)", lambda x: torch.acos(x), _x(-0.9, 0.9)),
    Case("atan(x)", lambda x: torch.atan(x), _x()),
    Case("sinh(x)", lambda x: torch.sinh(x), _x()),
    Case("cosh(x)", lambda x: torch.cosh(x), _x()),
    Case("tanh(x)", lambda x: torch.tanh(x), _x()),
    Case("asinh(x)", lambda x: torch.asinh(x), _x()),
    Case("acosh(x)", lambda x: torch.acosh(x), _x(1.1, 4.0)),
    Case("atanh(x)", lambda x: torch.atanh(x), _x(-0.9, 0.9)),
    Case("exp(x)", lambda x: torch.exp(x), _x()),
    Case("expm1(x)", lambda x: torch.expm1(x), _x()),
    Case("log(x)", lambda x: torch.log(x), _x(0.1, 4.0)),
    Case("log1p(x)", lambda x: torch.log1p(x), _x(-0.9, 4.0)),
    Case("log2(x)", lambda x: torch.log2(x), _x(0.1, 4.0)),
    Case("log10(x)", lambda x: torch.log10(x), _x(0.1, 4.0)),
    Case("sqrt(x)", lambda x: torch.sqrt(x), _x(0.1, 4.0)),
    Case("rsqrt(x)", lambda x: torch.rsqrt(x), _x(0.1, 4.0)),
    Case("abs(x)", lambda x: torch.abs(x), _x()),
    Case("sigmoid(x)", lambda x: torch.sigmoid(x), _x()),
    Case("relu(x)", lambda x: torch.relu(x), _x()),
    Case("softplus(x)", lambda x: F.softplus(x), _x(-10.0, 10.0)),
    Case("gelu(x)", lambda x: F.gelu(x), _x()),
    Case("silu(x)", lambda x: F.silu(x), _x()),
    Case("erf(x)", lambda x: torch.erf(x), _x()),
    Case("atan2(y, x)", lambda x, y: torch.atan2(y, x), {"x": ((5,), -2, 2), "y": ((5,), -2, 2)}),
    Case("pow(a, b)", lambda a, b: torch.pow(a, b), {"a": ((5,), 0.2, 3), "b": ((5,), -2, 2)}),
    Case("minimum(a, b)", lambda a, b: torch.minimum(a, b), {"a": AB, "b": AB}),
    Case("maximum(a, b)", lambda a, b: torch.maximum(a, b), {"a": AB, "b": AB}),
    Case(
        "clamp(x, lo, hi)",
        lambda x, lo, hi: torch.clamp(x, lo, hi),
        {"x": ((8,), -2, 2), "lo": ((8,), -1.5, -0.5), "hi": ((8,), 0.5, 1.5)},
    ),
    Case("sum(x)", lambda x: x.sum(), _x(shape=M)),
    Case("sum(x, 1)", lambda x: x.sum(dim=1), _x(shape=M)),
    Case("mean(x)", lambda x: x.mean(), _x(shape=M)),
    Case("mean(x, -2)", lambda x: x.mean(dim=0), _x(shape=M)),
    Case("prod(x)", lambda x: x.prod(), _x(0.5, 1.5, M)),
    Case("prod(x, 0)", lambda x: x.prod(dim=0), _x(shape=M)),
    Case("norm(x)", lambda x: x.square().sum().sqrt(), _x(shape=M)),
    Case("norm(x, 1)", lambda x: x.square().sum(dim=1).sqrt(), _x(shape=M)),
    Case("logsumexp(x, 1)", lambda x: torch.logsumexp(x, dim=1), _x(shape=M)),
    Case("softmax(x, 0)", lambda x: F.softmax(x, dim=0), _x(shape=M)),
    Case("matmul(a, b)", lambda a, b: a @ b, {"a": ((3, 4), -1, 1), "b": ((4, 2), -1, 1)}),
    Case("dot(a, b)", lambda a, b: (a * b).sum(), {"a": ((5,), -1, 1), "b": ((5,), -1, 1)}),
    Case("transpose(x, 0, 1)", lambda x: x.T, _x(shape=M)),
    Case("reshape(x, 2, -1)", lambda x: x.view(2, 6), _x(shape=M)),
    Case("x + y", lambda x, y: x + y, {"x": ((5,), -2, 2), "y": ((5,), -2, 2)}),
    Case("x - y", lambda x, y: x - y, {"x": ((5,), -2, 2), "y": ((5,), -2, 2)}),
    Case("x * y", lambda x, y: x * y, {"x": ((5,), -2, 2), "y": ((5,), -2, 2)}),
    Case("x / y", lambda x, y: x / y, {"x": ((5,), -2, 2), "y": ((5,), 0.5, 2)}),
    Case("x ** y", lambda x, y: x**y, {"x": ((5,), 0.2, 3), "y": ((5,), -2, 2)}),
    # x / y stays within (2, 3), so the floor is 2 and the derivative in y is -2.
    Case("x % y", lambda x, y: x - 2 * y, {"x": ((5,), 2.1, 2.9), "y": ((5,), 1.0, 1.04)}),
    Case("a @ b", lambda a, b: a @ b, {"a": ((3, 4), -1, 1), "b": ((4,), -1, 1)}),
    Case("-x", lambda x: -x, _x()),
    Case("+x * 2", lambda x: x * 2, _x()),
    Case("x ** 2 + 3 * x - 0.5", lambda x: x * x + 3 * x - 0.5, _x()),
    Case("pi * x + e", lambda x: math.pi * x + math.e, _x()),
    Case(
        "sin(x) * exp(-y) / (1 + z ** 2)",
        lambda x, y, z: torch.sin(x) * torch.exp(-y) / (1 + z * z),
        {"x": ((5,), -2, 2), "y": ((5,), -2, 2), "z": ((5,), -2, 2)},
    ),
]


def _case_id(case: Case) -> str:
    return case.source


def _bound(
    case: Case,
) -> tuple[
    Callable[..., torch.Tensor],
    tuple[torch.Tensor, ...],
    tuple[torch.Tensor, ...],
    Callable[..., torch.Tensor],
]:
    """(our function, primals, tangents, the reference as a positional function)."""
    compiled = compile_expression(case.source)
    primals, tangents = case.inputs("primal"), case.inputs("tangent")
    assert compiled.variables == tuple(primals)

    def reference(*args: torch.Tensor) -> torch.Tensor:
        return case.reference(**dict(zip(compiled.variables, args, strict=True)))

    return (
        compiled.bind(F64, CPU),
        tuple(primals.values()),
        tuple(t - t.mean() for t in tangents.values()),
        reference,
    )


def test_cover_every_allowed_function_and_operator():
    sources = " ".join(case.source for case in CASES)
    called = set(re.findall(r"([a-z0-9_]+)\(", sources))
    assert set(ALLOWED_FUNCTIONS) <= called, set(ALLOWED_FUNCTIONS) - called
    assert all(f" {op} " in sources for op in ALLOWED_OPERATORS)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_jvp_matches_torch_reference(case):
    fn, primals, tangents, reference = _bound(case)
    out, tangent = jvp(fn, primals, tangents)
    expected_out, expected_tangent = jvp(reference, primals, tangents)
    assert out.dtype == F64
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected_tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_jvp_matches_torch_reference_with_dual_tensors(case):
    fn, primals, tangents, reference = _bound(case)
    _, expected_tangent = jvp(reference, primals, tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        tangent = fwAD.unpack_dual(fn(*duals)).tangent
    torch.testing.assert_close(tangent, expected_tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_jvp_matches_finite_differences(case):
    fn, primals, tangents, _ = _bound(case)
    step = 1e-6
    ahead = fn(*(p + step * t for p, t in zip(primals, tangents, strict=True)))
    behind = fn(*(p - step * t for p, t in zip(primals, tangents, strict=True)))
    _, tangent = jvp(fn, primals, tangents)
    torch.testing.assert_close(tangent, (ahead - behind) / (2 * step), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "source",
    [
        "sin(x) * y",
        "softplus(x) + logsumexp(x * y, -1)",
        "sum(reshape(x, -1, 2), 0) * 2",
        "transpose(x, 0, 1) @ y",
        "norm(x) + 9 ** 9 ** 9 * 0 + pi",
    ],
)
def test_vmap_jvp_matches_loop(source):
    compiled = compile_expression(source)
    fn = compiled.bind(F64, CPU)
    n = len(compiled.variables)
    generator = torch.Generator().manual_seed(7)
    primals = [torch.randn(5, 4, 4, dtype=F64, generator=generator) for _ in range(n)]
    tangents = [torch.randn(5, 4, 4, dtype=F64, generator=generator) for _ in range(n)]

    def one(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return jvp(fn, args[:n], args[n:])

    batched = vmap(one)(*primals, *tangents)
    looped = [one(*(a[i] for a in primals + tangents)) for i in range(5)]
    for k in range(2):
        torch.testing.assert_close(
            batched[k], torch.stack([r[k] for r in looped]), rtol=1e-12, atol=1e-12, equal_nan=True
        )
    # And each item against torch.func.jvp of the function written in torch.
    reference = _VMAP_REFERENCES[source]
    for i in range(5):
        want = jvp(reference, tuple(p[i] for p in primals), tuple(t[i] for t in tangents))
        for k in range(2):
            torch.testing.assert_close(
                batched[k][i], want[k], rtol=1e-12, atol=1e-12, equal_nan=True
            )


_VMAP_REFERENCES = {
    "sin(x) * y": lambda x, y: torch.sin(x) * y,
    "softplus(x) + logsumexp(x * y, -1)": lambda x, y: (
        torch.logaddexp(x, torch.zeros_like(x)) + torch.logsumexp(x * y, -1)
    ),
    "sum(reshape(x, -1, 2), 0) * 2": lambda x: torch.sum(torch.reshape(x, (-1, 2)), 0) * 2,
    "transpose(x, 0, 1) @ y": lambda x, y: x.T @ y,
    "norm(x) + 9 ** 9 ** 9 * 0 + pi": lambda x: (
        torch.linalg.vector_norm(x) + torch.tensor(math.inf, dtype=F64) * 0 + math.pi
    ),
}


def test_compile_expression_sorts_variables():
    assert compile_expression("zeta * alpha + sin(mid) + alpha").variables == (
        "alpha",
        "mid",
        "zeta",
    )


def test_compile_expression_caches():
    assert compile_expression("x * 3") is compile_expression("x * 3")
    assert compile_expression("x * 3") is not compile_expression("x * 3", max_nodes=10)


def test_bind_caches_per_dtype_and_device():
    compiled = compile_expression("x * 2 + pi")
    assert compiled.bind(F64, CPU) is compiled.bind(F64, torch.device("cpu"))
    f32 = compiled.bind(torch.float32, CPU)
    assert f32 is not compiled.bind(F64, CPU)
    assert f32(torch.ones(2)).dtype == torch.float32


def test_bind_makes_constants_in_dtype():
    assert compile_expression("pi").bind(F64, CPU)().item() == math.pi
    assert compile_expression("e").bind(F64, CPU)().item() == math.e
    tenth = compile_expression("0.1").bind(torch.float32, CPU)()
    assert tenth.dtype == torch.float32
    assert tenth.item() != 0.1  # rounded to float32, so not the float64 0.1
    assert tenth.item() == pytest.approx(0.1, rel=1e-7)


def test_bind_without_variables_returns_0d_inf():
    out = compile_expression("9**9**9").bind(torch.float32, CPU)()
    assert out.shape == () and out.dtype == torch.float32 and out.item() == math.inf


def test_bind_huge_exponent_returns_value():
    fn = compile_expression("x ** 9**9**9").bind(F64, CPU)
    assert fn(torch.tensor([2.0, 1.0, 0.5], dtype=F64)).tolist() == [math.inf, 1.0, 0.0]


def test_compile_expression_huge_integer_literal_is_inf():
    fn = compile_expression("1" + "0" * 400 + " * x").bind(F64, CPU)
    assert fn(torch.tensor(1.0, dtype=F64)).item() == math.inf


def test_bind_rejects_wrong_number_of_tensors():
    fn = compile_expression("x + y").bind(F64, CPU)
    with pytest.raises(TypeError, match=r"Expected 2 tensors \(x, y\), got 1"):
        fn(torch.ones(1))


REJECTED = [
    ("x +", InvalidExpression, "Syntax error"),
    ("sin(x", InvalidExpression, "Syntax error"),
    ("", InvalidExpression, "empty"),
    ("foo(x)", InvalidExpression, "Unknown function 'foo'; allowed functions: abs, acos"),
    ("sin", InvalidExpression, "Function 'sin' must be called, like sin(x)"),
    ("_x + 1", InvalidExpression, "must not start with '_'"),
    ("x.__class__", InvalidExpression, "Attribute access"),
    ("x[0]", InvalidExpression, "Indexing"),
    ("lambda: 1", InvalidExpression, "lambda is not allowed"),
    ("[i for i in x]", InvalidExpression, "list comprehension"),
    ("(i for i in x)", InvalidExpression, "generator expression"),
    ('"abc"', InvalidExpression, "String literal"),
    ("b'abc'", InvalidExpression, "Bytes literal"),
    ('f"{x}"', InvalidExpression, "f-string"),
    ("sum(x, dim=__import__('os'))", InvalidExpression, "positional arguments only, got 'dim='"),
    ("sum(x, **y)", InvalidExpression, "positional arguments only, got '**y'"),
    ("__import__('os').system('ls')", InvalidExpression, "Attribute access"),
    ("__import__('os')", InvalidExpression, "Unknown function '__import__'"),
    ("().__class__.__bases__[0].__subclasses__()", InvalidExpression, "Attribute access"),
    ("x if x else y", InvalidExpression, "conditional expression"),
    ("x < y", InvalidExpression, "comparison"),
    ("x and y", InvalidExpression, "boolean operator"),
    ("(x := 1)", InvalidExpression, "assignment expression"),
    ("*x", InvalidExpression, "Syntax error"),
    ("sum(*x)", InvalidExpression, "starred argument"),
    ("open('/etc/passwd')", InvalidExpression, "Unknown function 'open'"),
    ("eval('1')", InvalidExpression, "Unknown function 'eval'"),
    ("exec", InvalidExpression, "Name 'exec' is a Python builtin"),
    ("getattr(x, 'y')", InvalidExpression, "Unknown function 'getattr'"),
    ("True", InvalidExpression, "The literal True is not allowed"),
    ("None", InvalidExpression, "The literal None is not allowed"),
    ("...", InvalidExpression, "The literal ... is not allowed"),
    ("1j", InvalidExpression, "Complex literal '1j'"),
    ("[x, y]", InvalidExpression, "list display"),
    ("(x, y)", InvalidExpression, "tuple"),
    ("{x: y}", InvalidExpression, "dict display"),
    ("f(x)(y)", InvalidExpression, "Only a function name can be called"),
    ("x // y", InvalidExpression, "Operator '//' is not allowed; allowed operators: + - * / **"),
    ("x ^ y", InvalidExpression, "Operator '^'"),
    ("~x", InvalidExpression, "Unary operator '~'"),
    ("not x", InvalidExpression, "Unary operator 'not'"),
    ("sum(x, y)", InvalidExpression, "sum() argument 2 must be an integer literal"),
    ("sum(x, 1.0)", InvalidExpression, "must be an integer literal"),
    ("sum(x, True)", InvalidExpression, "must be an integer literal"),
    ("sum(x, 1 + 1)", InvalidExpression, "must be an integer literal"),
    ("sum(x, 65)", InvalidExpression, "dimension 65; dimensions must be within [-64, 64]"),
    ("sum(x, -99999999999999999999)", InvalidExpression, "dimensions must be within"),
    ("reshape(x, 2, -2)", InvalidExpression, "shape entry -2"),
    ("reshape(x, 2 ** 40)", InvalidExpression, "must be an integer literal"),
    ("reshape(x, 4294967296)", InvalidExpression, "shape entry 4294967296"),
    ("reshape(x, -1, -1)", InvalidExpression, "-1 in at most one shape entry"),
    ("sum(x, 1, 2)", InvalidExpression, "sum() takes 1 or 2 arguments, got 3"),
    ("sin()", InvalidExpression, "sin() takes 1 argument, got 0"),
    ("clamp(x, 1)", InvalidExpression, "clamp() takes 3 arguments, got 2"),
    ("reshape(x)", InvalidExpression, "reshape() takes 2 to 65 arguments, got 1"),
    ("x\x00", InvalidExpression, "Character '\\x00' at position 1"),
    ("\uff45\uff58\uff45\uff43", InvalidExpression, "printable ASCII only"),  # fullwidth 'exec'
    ("x" * 2001, TooLarge, "Expression has 2001 characters; the limit is 2000"),
    ("-" * 10000 + "x", TooLarge, "Expression has 10001 characters; the limit is 2000"),
    ("(" * 5000 + "x" + ")" * 5000, TooLarge, "characters; the limit is 2000"),
    ("-" * 60 + "x", TooLarge, "Expression is nested 61 levels deep; the limit is 50"),
    ("(" * 51 + "x" + ")" * 51, TooLarge, "nests brackets 51 levels deep; the limit is 50"),
]


@pytest.mark.parametrize(
    ("source", "error", "message"), REJECTED, ids=[row[0][:40] for row in REJECTED]
)
def test_compile_expression_rejects(source, error, message):
    with pytest.raises(error) as info:
        compile_expression(source)
    assert message in info.value.message
    assert info.value.param == "expression"


def _balanced(leaves: int) -> str:
    return "x" if leaves == 1 else f"({_balanced(leaves // 2)} + {_balanced(leaves - leaves // 2)})"


def test_compile_expression_rejects_too_many_nodes():
    source = _balanced(300)  # 599 nodes, depth 10, under 2000 characters
    assert len(source) < 2000
    with pytest.raises(TooLarge, match="Expression has 599 nodes; the limit is 500"):
        compile_expression(source)
    assert compile_expression(source, max_nodes=600).variables == ("x",)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("-" * 10000 + "x", "nested"),
        ("x + " * 5000 + "x", "nested"),
        ("(" * 5000 + "x" + ")" * 5000, "nests brackets 5000 levels deep"),
        ("sin(" * 5000 + "x" + ")" * 5000, "nests brackets 5000 levels deep"),
    ],
    ids=["unary", "binary", "parentheses", "calls"],
)
def test_compile_expression_rejects_deep_nesting_without_recursion_error(source, message):
    with pytest.raises(TooLarge, match=message):
        compile_expression(source, max_length=10**6, max_nodes=10**6)


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(
            list("xy01.e+-*/%@()[]{},:'_ !<=~^&|\x00\n\tjsinmupqr\u00e9\uff45")
        ),
        max_size=60,
    )
)
def test_compile_expression_raises_only_engine_errors(source):
    try:
        compiled = compile_expression(source)
    except EngineError as exc:
        assert isinstance(exc, InvalidExpression | TooLarge)
        assert exc.message and exc.param == "expression"
    else:
        assert all(name.isidentifier() and not name.startswith("_") for name in compiled.variables)


_LEAVES = st.sampled_from(["x", "y", "2", "0.5", "pi"])
_UNARY = st.sampled_from(["sin", "tanh", "softplus", "sigmoid", "atan", "exp"])
_BINARY = st.sampled_from(["+", "-", "*", "/"])
_EXPRESSIONS = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda f, a: f"{f}({a})", _UNARY, inner),
        st.builds(lambda a, op, b: f"({a} {op} {b})", inner, _BINARY, inner),
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(_EXPRESSIONS)
def test_jvp_agrees_between_func_jvp_and_dual_tensors(source):
    compiled = compile_expression(source)
    assume(compiled.variables)
    fn = compiled.bind(F64, CPU)
    primals = tuple(torch.linspace(-1, 1, 4, dtype=F64) + i for i in range(len(compiled.variables)))
    tangents = tuple(torch.full((4,), 0.5 + i, dtype=F64) for i in range(len(compiled.variables)))
    out, tangent = jvp(fn, primals, tangents)
    with fwAD.dual_level():
        dual = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
        unpacked = fwAD.unpack_dual(dual)
        dual_out, dual_tangent = unpacked.primal, unpacked.tangent
    torch.testing.assert_close(out, dual_out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(tangent, dual_tangent, rtol=0, atol=0, equal_nan=True)
    # And against torch.func.jvp of the same text evaluated here, with torch directly
    # (Python's ast, not the compiler); its kernels may round differently in the last bits.
    names = compiled.variables

    def reference(*args: torch.Tensor) -> torch.Tensor:
        return _evaluate(ast.parse(source, mode="eval").body, dict(zip(names, args, strict=True)))

    want_out, want_tangent = jvp(reference, primals, tangents)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-9, atol=1e-9, equal_nan=True)


_TORCH_UNARY = {
    "sin": torch.sin,
    "tanh": torch.tanh,
    "softplus": lambda a: torch.logaddexp(a, torch.zeros_like(a)),
    "sigmoid": torch.sigmoid,
    "atan": torch.atan,
    "exp": torch.exp,
}
_TORCH_BINARY = {ast.Add: torch.add, ast.Sub: torch.sub, ast.Mult: torch.mul, ast.Div: torch.div}


def _evaluate(node: ast.expr, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """The generated expressions' language, in torch: numbers, x, y, pi, + - * /, calls."""
    if isinstance(node, ast.Constant):
        return torch.tensor(float(node.value), dtype=F64)
    if isinstance(node, ast.Name):
        return env[node.id] if node.id in env else torch.tensor(math.pi, dtype=F64)
    if isinstance(node, ast.BinOp):
        op = _TORCH_BINARY[type(node.op)]
        return op(_evaluate(node.left, env), _evaluate(node.right, env))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return _TORCH_UNARY[node.func.id](_evaluate(node.args[0], env))


LITERAL_CASES = [
    # (source, the same written with 0-d tensor constants c(v), as the literals were bound)
    ("2 * x + x / 3 - 1 + 0.5 * y", lambda x, y, c: c(2) * x + x / c(3) - c(1) + c(0.5) * y),
    # 1 / x is torch.reciprocal(x): the same output; the JVP by reciprocal's own formula
    ("3 - x * y + 1 / x", lambda x, y, c: c(3) - x * y + torch.reciprocal(x)),
    ("0.1 + x - 0.7 * (y - 0.3)", lambda x, y, c: c(0.1) + x - c(0.7) * (y - c(0.3))),
    ("2.5 / x + y / 0.1", lambda x, y, c: c(2.5) / x + y / c(0.1)),
]


@pytest.mark.parametrize(("source", "written"), LITERAL_CASES, ids=[c[0] for c in LITERAL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_literal_operands_give_the_numbers_of_tensor_constants(source, written, dtype):
    # NOTE [literal operands]: literals beside a tensor go to the Scalar overloads (no
    # zero tangent, no slow path); the output and JVP are bit for bit those of the
    # expression written with 0-d tensor constants of the dtype, in both engines and
    # under vmap.
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(6, 5, generator=g, dtype=dtype) + 0.5).requires_grad_(False)
    y = torch.randn(6, 5, generator=g, dtype=dtype)
    tx, ty = (
        torch.randn(6, 5, generator=g, dtype=dtype),
        torch.randn(6, 5, generator=g, dtype=dtype),
    )

    def c(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=dtype)

    f = compile_expression(source).bind(dtype, torch.device("cpu"))
    ref_out, ref_jvp = jvp(lambda a, b: written(a, b, c), (x, y), (tx, ty))
    out, got = jvp(f, (x, y), (tx, ty))
    assert torch.equal(out, ref_out) and torch.equal(got, ref_jvp)
    with fwAD.dual_level():
        dual = f(fwAD.make_dual(x, tx), fwAD.make_dual(y, ty))
        primal, tangent = fwAD.unpack_dual(dual)
    assert torch.equal(primal, ref_out) and torch.equal(tangent, ref_jvp)
    xs, ys = torch.stack([x, 2 * x]), torch.stack([y, -y])
    txs, tys = torch.stack([tx, ty]), torch.stack([ty, tx])
    _, batched = vmap(lambda a, b, ta, tb: jvp(f, (a, b), (ta, tb)))(xs, ys, txs, tys)
    for i in range(2):
        _, one = jvp(lambda a, b: written(a, b, c), (xs[i], ys[i]), (txs[i], tys[i]))
        torch.testing.assert_close(
            batched[i], one, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0
        )


def test_literal_operands_in_float16_are_close_to_float64():
    g = torch.Generator().manual_seed(12)
    x = torch.rand(50, generator=g, dtype=torch.float64) + 0.5
    tx = torch.randn(50, generator=g, dtype=torch.float64)
    source = "0.1 * x + 3 - 1 / x"
    _, ref = jvp(compile_expression(source).bind(torch.float64, torch.device("cpu")), (x,), (tx,))
    half = compile_expression(source).bind(torch.float16, torch.device("cpu"))
    _, got = jvp(half, (x.half(),), (tx.half(),))
    torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3)
