"""The safe expression language: user text -> a torch callable.

    >>> import torch
    >>> expr = compile_expression("sin(x) * y + 2")
    >>> expr.variables
    ('x', 'y')
    >>> f = expr.bind(torch.float64, torch.device("cpu"))
    >>> float(f(torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)))
    2.0

The text is parsed with ``ast.parse(mode="eval")`` and the tree is walked
against an allow-list; nothing the user wrote is ever run by eval, exec or
compile. The language:

* numbers (int and float literals; no bool, complex, string or None), the
  constants ``pi`` and ``e``, and free variables (identifiers not starting with
  ``_``, not a function name and not a Python builtin name such as ``exec``);
* operators ``+ - * / ** % @`` (``%`` has Python's sign convention, like
  ``torch.remainder``), unary ``-`` and ``+``, parentheses;
* calls of the functions in :data:`ALLOWED_FUNCTIONS`, positional arguments
  only. Dimension and shape arguments are integer literals, optionally negated:
  ``sum(x, -1)``, ``reshape(x, 2, -1)``; keyword forms like ``sum(x, dim=0)``
  are rejected with a message showing the positional form.

# NOTE [no Python arithmetic on user numbers]
Every literal becomes a tensor of the computation dtype when the expression is
bound, and nothing is folded at compile time, so ``9**9**9`` is a tensor power
that returns ``inf`` at once instead of a Python big-integer computation that
never ends. Integer literals too large for a float become ``inf``.

# NOTE [limits]
Length is checked before parsing; bracket nesting is checked before parsing
too, because CPython's parser has its own (smaller, differently worded) limits.
Node count and depth are measured with an iterative walk, and only then is the
tree translated recursively, so a deep input can never raise RecursionError.
A node is any AST node except operator and context markers, so ``sin(x)`` has
3 nodes (the call, ``sin``, ``x``) and depth 2.
"""

# NOTE [one module: the expression compiler]
# Over 450 lines on purpose: the parser's limits, the allowed grammar, the AST checks and
# the binding to torch are one language definition; split, a construct could be allowed
# by one part and unknown to another.

from __future__ import annotations

import ast
import builtins
import functools
import keyword
import math
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from app.engine import functions
from app.engine.errors import InvalidExpression, TooLarge

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ALLOWED_OPERATORS",
    "CONSTANTS",
    "CompiledExpression",
    "FunctionSpec",
    "compile_expression",
]

_PARAM = "expression"
MAX_DIM = 64  # |dim| bound for dimension arguments, and the most entries a shape may have
MAX_SHAPE_ENTRY = 2**31


@dataclass(frozen=True)
class FunctionSpec:
    """One allowed function: leading tensor arguments, then integer-literal arguments."""

    signature: str
    description: str
    impl: Callable[..., Tensor]
    n_tensors: int = 1
    n_ints: tuple[int, int] = (0, 0)  # (min, max) trailing integer-literal arguments
    int_kind: Literal["dim", "shape"] = "dim"

    @property
    def arity(self) -> tuple[int, int]:
        return self.n_tensors + self.n_ints[0], self.n_tensors + self.n_ints[1]


def _reduce(op: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def reduce(x: Tensor, dim: int | None = None) -> Tensor:
        return op(x) if dim is None else op(x, dim)

    return reduce


def _norm(x: Tensor, dim: int | None = None) -> Tensor:
    return torch.linalg.vector_norm(x, 2, dim)


def _reshape(x: Tensor, *shape: int) -> Tensor:
    return torch.reshape(x, shape)


def _unary(name: str, description: str) -> FunctionSpec:
    impl = functions.ACCURATE.get(name) or getattr(torch, name)
    return FunctionSpec(f"{name}(x)", description, impl)


# name -> what it computes. The function is functions.ACCURATE's where the native formula
# loses accuracy (NOTE [accurate elementwise functions]), torch's of that name otherwise.
_UNARY: dict[str, str] = {
    "sin": "sine",
    "cos": "cosine",
    "tan": "tangent",
    "asin": "inverse sine, domain [-1, 1]",
    "acos": "inverse cosine, domain [-1, 1]",
    "atan": "inverse tangent",
    "sinh": "hyperbolic sine",
    "cosh": "hyperbolic cosine",
    "tanh": "hyperbolic tangent",
    "asinh": "inverse hyperbolic sine",
    "acosh": "inverse hyperbolic cosine, domain [1, inf)",
    "atanh": "inverse hyperbolic tangent, domain (-1, 1)",
    "exp": "e**x",
    "expm1": "e**x - 1, accurate near 0",
    "log": "natural logarithm",
    "log1p": "log(1 + x), accurate near 0",
    "log2": "base-2 logarithm",
    "log10": "base-10 logarithm",
    "sqrt": "square root",
    "rsqrt": "1 / sqrt(x)",
    "abs": "absolute value",
    "sigmoid": "1 / (1 + e**-x)",
    "relu": "max(x, 0)",
    "softplus": "log(1 + e**x), exact for all x (no threshold)",
    "gelu": "x * Phi(x), the exact (erf) form",
    "silu": "x * sigmoid(x)",
    "erf": "error function",
}

ALLOWED_FUNCTIONS: Mapping[str, FunctionSpec] = MappingProxyType(
    {name: _unary(name, doc) for name, doc in _UNARY.items()}
    | {
        "atan2": FunctionSpec("atan2(y, x)", "angle of the point (x, y)", functions.atan2, 2),
        "pow": FunctionSpec("pow(a, b)", "a ** b", torch.pow, 2),
        "minimum": FunctionSpec("minimum(a, b)", "elementwise minimum", torch.minimum, 2),
        "maximum": FunctionSpec("maximum(a, b)", "elementwise maximum", torch.maximum, 2),
        "clamp": FunctionSpec("clamp(x, lo, hi)", "min(max(x, lo), hi)", torch.clamp, 3),
        "sum": FunctionSpec(
            "sum(x[, dim])", "sum, of all or along dim", _reduce(torch.sum), 1, (0, 1)
        ),
        "mean": FunctionSpec(
            "mean(x[, dim])", "mean, of all or along dim", _reduce(torch.mean), 1, (0, 1)
        ),
        "prod": FunctionSpec(
            "prod(x[, dim])", "product, of all or along dim", _reduce(torch.prod), 1, (0, 1)
        ),
        "norm": FunctionSpec(
            "norm(x[, dim])", "Euclidean (2-)norm, of all or along dim", _norm, 1, (0, 1)
        ),
        "logsumexp": FunctionSpec(
            "logsumexp(x, dim)",
            "log(sum(exp(x), dim)); derivative 0 on all -inf slices",
            functions.logsumexp,
            1,
            (1, 1),
        ),
        "softmax": FunctionSpec(
            "softmax(x, dim)", "exp(x) / sum(exp(x), dim)", torch.softmax, 1, (1, 1)
        ),
        "matmul": FunctionSpec("matmul(a, b)", "matrix product, same as a @ b", torch.matmul, 2),
        "dot": FunctionSpec("dot(a, b)", "inner product of two 1-D tensors", torch.dot, 2),
        "transpose": FunctionSpec(
            "transpose(x, d0, d1)", "swap dimensions d0 and d1", torch.transpose, 1, (2, 2)
        ),
        "reshape": FunctionSpec(
            "reshape(x, d0, d1, ...)",
            "new shape; one entry may be -1",
            _reshape,
            1,
            (1, MAX_DIM),
            "shape",
        ),
    }
)

CONSTANTS: Mapping[str, float] = MappingProxyType({"pi": math.pi, "e": math.e})

_BINARY_OPS: dict[type[ast.operator], tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {
    ast.Add: ("+", torch.add),
    ast.Sub: ("-", torch.sub),
    ast.Mult: ("*", torch.mul),
    ast.Div: ("/", torch.div),
    ast.Pow: ("**", torch.pow),
    ast.Mod: ("%", torch.remainder),
    ast.MatMult: ("@", torch.matmul),
}
ALLOWED_OPERATORS: tuple[str, ...] = tuple(sym for sym, _ in _BINARY_OPS.values())
# Operators whose every output element depends only on the input elements at the same
# (broadcast) index: the unary functions, the elementwise binary ones, negation.
_ELEMENTWISE: frozenset[Callable[..., Tensor]] = frozenset(
    [
        *(ALLOWED_FUNCTIONS[name].impl for name in _UNARY),
        *(functions.atan2, torch.pow, torch.minimum, torch.maximum, torch.clamp, torch.neg),
        *(impl for _, impl in _BINARY_OPS.values() if impl is not torch.matmul),
    ]
)
_OTHER_OPERATORS = {
    ast.FloorDiv: "//",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Not: "not",
    ast.Invert: "~",
}

# Constructs outside the language, named the way a user would recognise them.
_CONSTRUCTS: dict[type[ast.AST], str] = {
    ast.Attribute: "Attribute access (x.name)",
    ast.Subscript: "Indexing and slicing (x[...])",
    ast.Lambda: "lambda",
    ast.ListComp: "A list comprehension",
    ast.SetComp: "A set comprehension",
    ast.DictComp: "A dict comprehension",
    ast.GeneratorExp: "A generator expression",
    ast.JoinedStr: "An f-string",
    ast.FormattedValue: "An f-string",
    ast.Compare: "A comparison (<, ==, in, is, ...)",
    ast.BoolOp: "A boolean operator (and, or)",
    ast.IfExp: "A conditional expression (a if c else b)",
    ast.NamedExpr: "An assignment expression (:=)",
    ast.Starred: "A starred argument (*x)",
    ast.List: "A list display [...]",
    ast.Tuple: "A tuple (a, b)",
    ast.Set: "A set display {...}",
    ast.Dict: "A dict display {...}",
    ast.Slice: "A slice (a:b)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
}
_IGNORED = (ast.expr_context, ast.operator, ast.unaryop, ast.boolop, ast.cmpop)
_BUILTIN_NAMES = (
    frozenset(dir(builtins)) | frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)
)
_ALLOWED_CONTROL = {"\t", "\n", "\r"}
_LANGUAGE = (
    "expressions may use numbers, variables, pi, e, the operators + - * / ** % @ "
    "and calls of the allowed functions"
)


# --- the compiled form -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Var:
    name: str


@dataclass(frozen=True)
class _Const:
    value: float


@dataclass(frozen=True)
class _Apply:
    impl: Callable[..., Tensor]
    args: tuple[_Node, ...]
    ints: tuple[int, ...] = ()


_Node = _Var | _Const | _Apply
_Evaluator = Callable[[tuple[Tensor, ...]], Tensor]


@dataclass(frozen=True)
class CompiledExpression:
    """A validated expression; :meth:`bind` turns it into a torch function."""

    source: str
    variables: tuple[str, ...]
    _program: _Node = field(repr=False)
    _bound: dict[tuple[torch.dtype, torch.device], Callable[..., Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def elementwise(self) -> bool:
        """Whether every operator acts element by element (with broadcasting): then
        stacking requests on a new leading dimension computes each one's numbers exactly
        (NOTE [stacking tiny expressions] in app/engine/stacking.py)."""
        stack = [self._program]
        while stack:
            node = stack.pop()
            if isinstance(node, _Apply):
                if node.impl not in _ELEMENTWISE or node.ints:
                    return False
                stack.extend(node.args)
        return True

    @property
    def operations(self) -> int:
        """How many operator calls one evaluation makes."""
        count, stack = 0, [self._program]
        while stack:
            node = stack.pop()
            if isinstance(node, _Apply):
                count += 1
                stack.extend(node.args)
        return count

    def bind(self, dtype: torch.dtype, device: torch.device) -> Callable[..., Tensor]:
        """A function of the variables' tensors, positional in ``variables`` order.

        Literals, ``pi`` and ``e`` become tensors of ``dtype`` on ``device``, made
        once here and cached per (dtype, device). The function does no Python
        control flow on tensor values and no in-place ops, so it works on dual
        tensors, inside ``torch.func.jvp`` and under ``torch.func.vmap``.
        """
        key = (dtype, torch.device(device))
        bound = self._bound.get(key)
        if bound is None:
            bound = _bind(self._program, self.variables, dtype, key[1])
            self._bound[key] = bound  # a lost race only builds an equal function twice
        return bound


# NOTE [literal operands]
# ``x * 2`` with the literal as a 0-d tensor makes forward AD give the literal a
# zero tangent: an efficient-zero tensor, whose kernels infer the result's shape
# through PyTorch's Python meta functions. On this project's 2-core machine that
# took 214 µs for a 10x10 dual tensor, against 7 µs for the Scalar overload, which
# has no tangent for the literal at all. So a literal beside a tensor in + - * /
# is passed as the Python float of the literal itself (but in c / x, which has no
# Scalar form; 1 / x is reciprocal). For float32 and float64 the kernels round it
# to the tensor's dtype as before, so the numbers are the same; for float16 and
# bfloat16 they now compute with the literal in float32, as PyTorch does for
# ``x * 2.0``.
_SCALAR_FORMS: dict[Callable[..., Tensor], tuple[Any, Any]] = {
    # impl: (tensor op literal, literal op tensor), each called as f(tensor, literal)
    torch.add: (torch.ops.aten.add.Scalar, torch.ops.aten.add.Scalar),
    torch.sub: (torch.ops.aten.sub.Scalar, torch.ops.aten.rsub.Scalar),
    torch.mul: (torch.ops.aten.mul.Scalar, torch.ops.aten.mul.Scalar),
    torch.div: (torch.ops.aten.div.Scalar, None),
}


def _bind(
    program: _Node, variables: tuple[str, ...], dtype: torch.dtype, device: torch.device
) -> Callable[..., Tensor]:
    constants: dict[float, Tensor] = {}
    index = {name: i for i, name in enumerate(variables)}

    def build(node: _Node) -> _Evaluator:
        if isinstance(node, _Var):
            i = index[node.name]
            return lambda args: args[i]
        if isinstance(node, _Const):
            if node.value not in constants:
                constants[node.value] = torch.tensor(node.value, dtype=dtype, device=device)
            c = constants[node.value]
            return lambda args: c
        impl, ints = node.impl, node.ints
        if impl is torch.pow and isinstance(node.args[1], _Const):
            # NOTE [literal exponents]: ``x ** 2`` with a Python float exponent takes
            # pow's Tensor_Scalar kernel, whose forward-AD formula is C++; a 0-d tensor
            # exponent goes through PyTorch's Python reference kernels, several times
            # slower. The float is the literal itself: no arithmetic ran on it.
            base, exponent = build(node.args[0]), node.args[1].value
            return lambda args: torch.pow(base(args), exponent)
        forms = _SCALAR_FORMS.get(impl)
        if forms is not None and len(node.args) == 2:
            left, right = node.args
            if isinstance(right, _Const) and not isinstance(left, _Const):
                tensor, literal, op = build(left), right.value, forms[0]
                return lambda args: op(tensor(args), literal)
            if isinstance(left, _Const) and not isinstance(right, _Const) and forms[1]:
                tensor, literal, op = build(right), left.value, forms[1]
                return lambda args: op(tensor(args), literal)
            if impl is torch.div and isinstance(left, _Const) and left.value == 1.0:
                tensor = build(right)  # 1 / x: reciprocal divides 1 by x, the same numbers
                return lambda args: torch.reciprocal(tensor(args))
        subs = tuple(build(arg) for arg in node.args)
        if len(subs) == 1:
            (a,) = subs
            return lambda args: impl(a(args), *ints)
        return lambda args: impl(*(s(args) for s in subs), *ints)

    root = build(program)
    n = len(variables)

    def evaluate(*args: Tensor) -> Tensor:
        if len(args) != n:
            raise TypeError(
                f"Expected {n} tensors ({', '.join(variables) or 'none'}), got {len(args)}"
            )
        return root(args)

    return evaluate


# --- compiling -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def compile_expression(
    source: str, *, max_length: int = 2000, max_nodes: int = 500, max_depth: int = 50
) -> CompiledExpression:
    """Parse and validate ``source``; cached on (source, limits).

    Raises:
        TooLarge: longer than ``max_length`` characters, more than ``max_nodes``
            nodes, or nested deeper than ``max_depth``.
        InvalidExpression: a syntax error, or a name or construct outside the language.
    """
    if not isinstance(source, str):
        raise InvalidExpression(
            f"Expression must be a string, got {type(source).__name__}", param=_PARAM
        )
    if len(source) > max_length:
        raise TooLarge(
            f"Expression has {len(source)} characters; the limit is {max_length}", param=_PARAM
        )
    _check_characters(source)
    _check_brackets(source, max_depth)
    tree = _parse(source, max_depth)
    _check_size(tree, max_nodes, max_depth)
    names: set[str] = set()
    program = _Translator(source, names).visit(tree.body)
    return CompiledExpression(source, tuple(sorted(names)), program)


def _check_characters(source: str) -> None:
    if not source.strip():
        raise InvalidExpression(
            "Expression is empty; expected something like 'sin(x) * y'", param=_PARAM
        )
    for pos, char in enumerate(source):
        # ASCII only: Python NFKC-normalises identifiers, so a non-ASCII name
        # could turn into a different one (fullwidth 'ｅｘｅｃ' -> 'exec').
        if not (char.isascii() and (char.isprintable() or char in _ALLOWED_CONTROL)):
            raise InvalidExpression(
                f"Character {char!r} at position {pos} is not allowed; expressions use "
                "printable ASCII only",
                param=_PARAM,
            )


def _check_brackets(source: str, max_depth: int) -> None:
    level = deepest = 0
    for char in source:
        if char in "([{":
            level += 1
            deepest = max(deepest, level)
        elif char in ")]}":
            level -= 1
    if deepest > max_depth:
        raise TooLarge(
            f"Expression nests brackets {deepest} levels deep; the limit is {max_depth}",
            param=_PARAM,
        )


_parse_lock = threading.Lock()  # catch_warnings swaps global state; don't interleave it


def _parse(source: str, max_depth: int) -> ast.Expression:
    try:
        # Silence tokenizer warnings (invalid escapes, "1if"): they would print user text.
        with _parse_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(source, mode="eval")
    except (RecursionError, MemoryError):
        raise TooLarge(
            f"Expression is nested too deeply to parse; the depth limit is {max_depth}",
            param=_PARAM,
        ) from None
    except SyntaxError as exc:
        if "too many nested" in (exc.msg or "") or "too complex" in (exc.msg or ""):
            raise TooLarge(
                f"Expression is nested too deeply to parse ({exc.msg}); the depth "
                f"limit is {max_depth}",
                param=_PARAM,
            ) from None
        where = f" at column {exc.offset}" if exc.offset else ""
        raise InvalidExpression(
            f"Syntax error{where}: {exc.msg}; expected an expression like 'sin(x) * y'",
            param=_PARAM,
        ) from None
    except ValueError as exc:  # e.g. an integer literal over Python's digit limit
        raise InvalidExpression(f"Syntax error: {exc}", param=_PARAM) from None


def _check_size(tree: ast.Expression, max_nodes: int, max_depth: int) -> None:
    nodes = deepest = 0
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        deepest = max(deepest, depth)
        stack.extend(
            (child, depth + 1)
            for child in ast.iter_child_nodes(node)
            if not isinstance(child, _IGNORED)
        )
    if deepest > max_depth:
        raise TooLarge(
            f"Expression is nested {deepest} levels deep; the limit is {max_depth}", param=_PARAM
        )
    if nodes > max_nodes:
        raise TooLarge(f"Expression has {nodes} nodes; the limit is {max_nodes}", param=_PARAM)


class _Translator:
    """AST -> _Node, accepting only the language (recursion is safe after _check_size)."""

    def __init__(self, source: str, names: set[str]) -> None:
        self.source = source
        self.names = names

    def fail(self, message: str) -> InvalidExpression:
        return InvalidExpression(message, param=_PARAM)

    def text(self, node: ast.AST) -> str:
        segment = ast.get_source_segment(self.source, node) or type(node).__name__
        return segment if len(segment) <= 60 else segment[:57] + "..."

    def visit(self, node: ast.expr) -> _Node:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.UnaryOp):
            return self.unaryop(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.construct(node)

    def construct(self, node: ast.AST) -> InvalidExpression:
        what = _CONSTRUCTS.get(type(node), f"The construct {type(node).__name__}")
        return self.fail(f"{what} is not allowed: '{self.text(node)}'; {_LANGUAGE}")

    def constant(self, node: ast.Constant) -> _Const:
        value = node.value
        if isinstance(value, bool) or value is None or value is Ellipsis:
            raise self.fail(f"The literal {self.text(node)} is not allowed; only numbers are")
        if isinstance(value, int):
            try:
                return _Const(float(value))
            except OverflowError:  # more digits than a double holds: see NOTE [no Python ...]
                return _Const(math.inf)
        if isinstance(value, float):
            return _Const(value)
        kind = {str: "String", bytes: "Bytes", complex: "Complex"}.get(type(value), "This")
        raise self.fail(f"{kind} literal '{self.text(node)}' is not allowed; only real numbers are")

    def name(self, node: ast.Name) -> _Node:
        name = node.id
        if name in CONSTANTS:
            return _Const(CONSTANTS[name])
        if name in ALLOWED_FUNCTIONS:
            raise self.fail(
                f"Function '{name}' must be called, like {ALLOWED_FUNCTIONS[name].signature}"
            )
        if name.startswith("_"):
            raise self.fail(f"Name '{name}' is not allowed; variable names must not start with '_'")
        if name in _BUILTIN_NAMES:
            raise self.fail(
                f"Name '{name}' is a Python builtin or keyword and cannot be a "
                "variable; choose another name"
            )
        self.names.add(name)
        return _Var(name)

    def binop(self, node: ast.BinOp) -> _Apply:
        op = _BINARY_OPS.get(type(node.op))
        if op is None:
            symbol = _OTHER_OPERATORS.get(type(node.op), type(node.op).__name__)
            raise self.fail(
                f"Operator '{symbol}' is not allowed; allowed operators: "
                f"{' '.join(ALLOWED_OPERATORS)}"
            )
        return _Apply(op[1], (self.visit(node.left), self.visit(node.right)))

    def unaryop(self, node: ast.UnaryOp) -> _Node:
        operand = self.visit(node.operand)
        if isinstance(node.op, ast.USub):
            return _Apply(torch.neg, (operand,))
        if isinstance(node.op, ast.UAdd):
            return operand
        symbol = _OTHER_OPERATORS.get(type(node.op), type(node.op).__name__)
        raise self.fail(f"Unary operator '{symbol}' is not allowed; only - and + are")

    def call(self, node: ast.Call) -> _Apply:
        if not isinstance(node.func, ast.Name):
            if type(node.func) in _CONSTRUCTS:
                raise self.construct(node.func)
            raise self.fail(
                f"Only a function name can be called, like sin(x); got '{self.text(node)}'"
            )
        name = node.func.id
        spec = ALLOWED_FUNCTIONS.get(name)
        if spec is None:
            raise self.fail(
                f"Unknown function '{name}'; allowed functions: "
                f"{', '.join(sorted(ALLOWED_FUNCTIONS))}"
            )
        if node.keywords:
            kw = node.keywords[0]
            given = "**" + self.text(kw.value) if kw.arg is None else kw.arg + "="
            raise self.fail(
                f"{name}() takes positional arguments only, got '{given}'; the "
                f"form is {spec.signature}"
            )
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.construct(arg)
        low, high = spec.arity
        if not low <= len(node.args) <= high:
            raise self.fail(
                f"{name}() takes {_count(low, high)}, got {len(node.args)}; the "
                f"form is {spec.signature}"
            )
        tensors = tuple(self.visit(arg) for arg in node.args[: spec.n_tensors])
        ints = tuple(
            self.integer(name, i, arg, spec)
            for i, arg in enumerate(node.args[spec.n_tensors :], spec.n_tensors + 1)
        )
        if spec.int_kind == "shape" and ints.count(-1) > 1:
            raise self.fail(f"{name}() allows -1 in at most one shape entry, got {ints.count(-1)}")
        return _Apply(spec.impl, tensors, ints)

    def integer(self, name: str, position: int, node: ast.expr, spec: FunctionSpec) -> int:
        """An integer literal such as 2 or -1 (so dims and shapes are known before running)."""
        sign, literal = 1, node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            sign = -1 if isinstance(node.op, ast.USub) else 1
            literal = node.operand
        if not (isinstance(literal, ast.Constant) and type(literal.value) is int):
            raise self.fail(
                f"{name}() argument {position} must be an integer literal such as 0 "
                f"or -1, got '{self.text(node)}'; the form is {spec.signature}"
            )
        value = sign * literal.value
        if spec.int_kind == "dim" and abs(value) > MAX_DIM:
            raise self.fail(
                f"{name}() argument {position} is dimension {value}; dimensions "
                f"must be within [-{MAX_DIM}, {MAX_DIM}]"
            )
        if spec.int_kind == "shape" and not -1 <= value <= MAX_SHAPE_ENTRY:
            raise self.fail(
                f"{name}() argument {position} is shape entry {value}; entries must "
                f"be -1 or within [0, {MAX_SHAPE_ENTRY}]"
            )
        return value


def _count(low: int, high: int) -> str:
    if low == high:
        return f"{low} argument" + ("" if low == 1 else "s")
    if high == low + 1:
        return f"{low} or {high} arguments"
    return f"{low} to {high} arguments"
