"""Accuracy of the expression language's functions in float64, against mpmath at 50 digits.

    .venv/bin/python bench/accuracy_survey.py            # the table (markdown), ~10 s
    .venv/bin/python bench/accuracy_survey.py --worst    # and each function's worst point

For every function of the language (``ALLOWED_FUNCTIONS``, elementwise ones;
the binary ones in each argument) and every point of a fixed set (edge points,
tiny and large magnitudes, the overflow thresholds), the value and the
derivative are computed the way the service computes them (the compiled
expression, forward AD with a tangent of 1) in tensors of length 1 and of
length 16 (PyTorch's vectorized kernels take over from the scalar ones at 16
elements on this CPU), and compared with mpmath's. The error is relative:
``|got - want| / max(|want|, 2.2e-308)`` (results in the subnormal range have no
relative precision to keep); an infinite result counts as exact when mpmath's
value overflows float64 with the same sign, and a NaN where mpmath has a number
(or the reverse) is an error of ``inf``. Points outside a function's domain are
skipped. The README's "Accuracy" section is this table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import mpmath
import torch
import torch.autograd.forward_ad as fwAD

from app.engine.expressions import compile_expression

mpmath.mp.dps = 50
F64 = torch.float64
LENGTHS = (1, 16)
SMALLEST_NORMAL = 2.2250738585072014e-308

_MAGNITUDES = [
    0.0, 5e-324, 1e-300, 1e-200, 1e-100, 1e-20, 1e-16, 1e-10, 1e-8, 1e-5, 1e-3, 0.1, 0.4, 0.5,
    0.7, 0.9, 0.999, 0.999999, 1 - 1e-10, 1.0, 1 + 1e-10, 1.000001, 1.001, 1.5, 2.0, 3.0, 5.0,
    6.0, 8.0, 9.0, 10.0, 15.0, 20.0, 26.0, 30.0, 36.0, 38.0, 40.0, 50.0, 100.0, 300.0, 700.0,
    709.7, 709.79, 710.0, 710.4, 710.5, 745.0, 1000.0, 1e5, 1e10, 1e15, 1e20, 1e100, 1e200,
    1e300, 1.7e308,
]  # fmt: skip
POINTS = sorted({s * m for m in _MAGNITUDES for s in (1.0, -1.0)} | {math.pi / 2, 1.5707963})

M = mpmath.mpf
Ref = Callable[[mpmath.mpf], mpmath.mpf]


@dataclass(frozen=True)
class Unary:
    value: Ref
    derivative: Ref
    domain: Callable[[float], bool] = lambda x: True


def _sigmoid(x: mpmath.mpf) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-x))


def _phi(x: mpmath.mpf) -> mpmath.mpf:
    return mpmath.exp(-(x**2) / 2) / mpmath.sqrt(2 * mpmath.pi)


def _cdf(x: mpmath.mpf) -> mpmath.mpf:
    if abs(x) > 1e10:  # mpmath's erfc overflows there; 1 - Phi(|x|) < exp(-5e19), far below 1e-50
        return M(x > 0)
    return mpmath.erfc(-x / mpmath.sqrt(2)) / 2


UNARY: dict[str, Unary] = {
    "sin": Unary(mpmath.sin, mpmath.cos),
    "cos": Unary(mpmath.cos, lambda x: -mpmath.sin(x)),
    "tan": Unary(mpmath.tan, lambda x: 1 / mpmath.cos(x) ** 2),
    "asin": Unary(mpmath.asin, lambda x: 1 / mpmath.sqrt(1 - x**2), lambda x: abs(x) < 1),
    "acos": Unary(mpmath.acos, lambda x: -1 / mpmath.sqrt(1 - x**2), lambda x: abs(x) < 1),
    "atan": Unary(mpmath.atan, lambda x: 1 / (1 + x**2)),
    "sinh": Unary(mpmath.sinh, mpmath.cosh),
    "cosh": Unary(mpmath.cosh, mpmath.sinh),
    "tanh": Unary(mpmath.tanh, lambda x: 1 / mpmath.cosh(x) ** 2),
    "asinh": Unary(mpmath.asinh, lambda x: 1 / mpmath.sqrt(x**2 + 1)),
    "acosh": Unary(mpmath.acosh, lambda x: 1 / mpmath.sqrt(x**2 - 1), lambda x: x > 1),
    "atanh": Unary(mpmath.atanh, lambda x: 1 / (1 - x**2), lambda x: abs(x) < 1),
    "exp": Unary(mpmath.exp, mpmath.exp),
    "expm1": Unary(mpmath.expm1, mpmath.exp),
    "log": Unary(mpmath.log, lambda x: 1 / x, lambda x: x > 0),
    "log1p": Unary(mpmath.log1p, lambda x: 1 / (1 + x), lambda x: x > -1),
    "log2": Unary(lambda x: mpmath.log(x, 2), lambda x: 1 / (x * mpmath.log(2)), lambda x: x > 0),
    "log10": Unary(mpmath.log10, lambda x: 1 / (x * mpmath.log(10)), lambda x: x > 0),
    "sqrt": Unary(mpmath.sqrt, lambda x: 1 / (2 * mpmath.sqrt(x)), lambda x: x > 0),
    "rsqrt": Unary(lambda x: 1 / mpmath.sqrt(x), lambda x: -(x**-1.5) / 2, lambda x: x > 0),
    "abs": Unary(abs, mpmath.sign, lambda x: x != 0),
    "sigmoid": Unary(_sigmoid, lambda x: _sigmoid(x) * _sigmoid(-x)),
    "relu": Unary(lambda x: max(x, M(0)), lambda x: M(x > 0), lambda x: x != 0),
    "softplus": Unary(lambda x: mpmath.log1p(mpmath.exp(x)), _sigmoid),
    "gelu": Unary(lambda x: x * _cdf(x), lambda x: _cdf(x) + x * _phi(x)),
    "silu": Unary(lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * _sigmoid(-x))),
    "erf": Unary(mpmath.erf, lambda x: 2 / mpmath.sqrt(mpmath.pi) * mpmath.exp(-(x**2))),
}

# Binary functions: (expression, value, partial in a, partial in b, domain).
_B = Callable[[mpmath.mpf, mpmath.mpf], mpmath.mpf]
BINARY: dict[str, tuple[str, _B, _B, _B, Callable[[float, float], bool]]] = {
    "pow": (
        "pow(a, b)",
        lambda a, b: a**b,
        lambda a, b: b * a ** (b - 1),
        lambda a, b: a**b * mpmath.log(a),
        lambda a, b: a > 0,
    ),
    "/": (
        "a / b",
        lambda a, b: a / b,
        lambda a, b: 1 / b,
        lambda a, b: -a / b**2,
        lambda a, b: b != 0,
    ),
    "%": (
        "a % b",
        lambda a, b: a - b * mpmath.floor(a / b),
        lambda a, b: M(1),
        lambda a, b: -mpmath.floor(a / b),
        lambda a, b: b != 0 and not float(a / b).is_integer(),
    ),
    "atan2": (
        "atan2(a, b)",
        mpmath.atan2,
        lambda a, b: b / (a**2 + b**2),
        lambda a, b: -a / (a**2 + b**2),
        lambda a, b: (a, b) != (0.0, 0.0),
    ),
}
PAIRS = [
    (a, b)
    for a in (1e-300, 1e-8, 0.5, 1.0, 2.0, 10.0, 1e8, 1e200, -0.5, -3.0)
    for b in (-1e200, -10.0, -2.5, -1.0, 0.0, 1e-8, 0.5, 1.0, 3.0, 10.0, 1e8, 1e200)
]


def relative_error(got: float, want: mpmath.mpf) -> float:
    if mpmath.isnan(want) or math.isnan(got):
        return 0.0 if (mpmath.isnan(want) and math.isnan(got)) else math.inf
    if abs(want) > 1.7976931348623157e308:
        return 0.0 if math.isinf(got) and (got > 0) == (want > 0) else math.inf
    if math.isinf(got):
        return math.inf
    return float(abs(M(got) - want) / max(abs(want), M(SMALLEST_NORMAL)))


def _service(source: str, primals: list[float], wrt: int, n: int) -> tuple[float, float]:
    """Value and derivative at one point, the service's way, in a tensor of length ``n``."""
    f = compile_expression(source).bind(F64, torch.device("cpu"))
    with fwAD.dual_level():
        args = [
            fwAD.make_dual(torch.full((n,), p, dtype=F64), torch.ones(n, dtype=F64))
            if i == wrt
            else torch.full((n,), p, dtype=F64)
            for i, p in enumerate(primals)
        ]
        out = f(*args)
        value, tangent = fwAD.unpack_dual(out)
    return float(value[-1]), 0.0 if tangent is None else float(tangent[-1])


@dataclass
class Row:
    name: str
    value: dict[int, tuple[float, str]]
    derivative: dict[int, tuple[float, str]]
    points: int = 0

    def add(self, kind: str, n: int, err: float, where: str) -> None:
        table = self.value if kind == "value" else self.derivative
        if err > table.get(n, (-1.0, ""))[0]:
            table[n] = (err, where)


def survey() -> list[Row]:
    rows: list[Row] = []
    for name, ref in UNARY.items():
        row = Row(name, {}, {})
        for x in POINTS:
            if not ref.domain(x):
                continue
            row.points += 1
            want_v, want_d = ref.value(M(x)), ref.derivative(M(x))
            for n in LENGTHS:
                v, d = _service(f"{name}(x)", [x], 0, n)
                row.add("value", n, relative_error(v, want_v), f"x={x!r}")
                row.add("derivative", n, relative_error(d, want_d), f"x={x!r}")
        rows.append(row)
    for source, value, da, db, domain in BINARY.values():
        for wrt, partial, arg in ((0, da, "a"), (1, db, "b")):
            row = Row(f"{source} (d/d{arg})", {}, {})
            for a, b in PAIRS:
                if not domain(a, b):
                    continue
                row.points += 1
                want_v, want_d = value(M(a), M(b)), partial(M(a), M(b))
                for n in LENGTHS:
                    v, d = _service(source, [a, b], wrt, n)
                    row.add("value", n, relative_error(v, want_v), f"a={a:.3g}, b={b:.3g}")
                    row.add("derivative", n, relative_error(d, want_d), f"a={a:.3g}, b={b:.3g}")
            rows.append(row)
    return rows


def _cell(err: float) -> str:
    if err == 0:
        return "0"
    text = "inf" if math.isinf(err) else f"{err:.1e}"
    return f"**{text}**" if err > 1e-12 else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worst", action="store_true", help="name each function's worst point")
    args = parser.parse_args()
    rows = survey()
    head = ["function", "points"]
    head += [f"value n={n}" for n in LENGTHS] + [f"derivative n={n}" for n in LENGTHS]
    if args.worst:
        head.append("worst at")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        cells = [f"`{row.name}`", str(row.points)]
        cells += [_cell(row.value[n][0]) for n in LENGTHS]
        cells += [_cell(row.derivative[n][0]) for n in LENGTHS]
        if args.worst:
            worst = max([*row.value.values(), *row.derivative.values()])
            cells.append(worst[1] if worst[0] > 1e-12 else "")
        print("| " + " | ".join(cells) + " |")
    print("\nRelative error, worst over the points (bold: above 1e-12).")


if __name__ == "__main__":
    main()
