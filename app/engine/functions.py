"""Custom autograd Functions where a hand-written derivative beats torch's own.

Each class defines ``forward``/``setup_context`` (the style that
``torch.func`` needs), a forward-mode ``jvp`` and a reverse-mode ``backward``,
and sets ``generate_vmap_rule = True`` so it also works under ``torch.func.vmap``
(the dynamic batcher vmaps over the JVP); `_SavesInputs` gives both of the latter to
those whose derivatives need only their inputs.

``jvp`` and ``backward`` are written with ordinary torch ops on the saved
tensors, so they are themselves differentiable (higher-order derivatives work).

    >>> import torch
    >>> x = torch.tensor([30.0], dtype=torch.float64)
    >>> bool(softplus(x) > 30.0)  # torch.nn.functional.softplus returns exactly 30.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ACCURATE",
    "LogSumExp",
    "Softplus",
    "atan2",
    "logsumexp",
    "sigmoid",
    "softplus",
]


class _SavesInputs(torch.autograd.Function):
    """vmap by the generated rule, and every input saved for ``jvp`` and ``backward``."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)


class Softplus(_SavesInputs):
    """softplus(x) = log(1 + exp(x)), computed as relu(x) + log1p(exp(-|x|)).

    Why not ``torch.nn.functional.softplus``: it returns ``x`` itself once
    ``x > threshold`` (20 by default), dropping ``log1p(exp(-x))``, which is
    about 2e-9 at x = 20 and well above float64 resolution up to x ~ 36; its
    derivative there is exactly 1 instead of sigmoid(x). This form has no
    threshold, never overflows (exp only sees non-positive arguments) and is
    accurate to a few ulp over the whole line. The derivative is sigmoid(x),
    so the JVP is ``sigmoid(x) * t``.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _sigmoid(x) * x_t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * _sigmoid(x)


def _softmax_weights(x: Tensor, result: Tensor, dim: int) -> Tensor:
    """exp(x - logsumexp(x)) along ``dim``, and 0 on slices whose logsumexp is -inf.

    # NOTE [logsumexp of an all -inf slice]
    When every entry of a slice is -inf the output is -inf, and moving any
    finite distance from -inf leaves it -inf: the function is locally constant,
    so its derivative is 0. torch computes exp(-inf - (-inf)) = NaN there.
    """
    lse = result.unsqueeze(dim)
    # On a dead slice subtract 0 instead of -inf: every x there is -inf, so the
    # weights are exp(-inf) = 0 and no NaN is ever formed (a NaN in an unused
    # `where` branch would still poison double-backward).
    safe_lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    return torch.exp(x - safe_lse)


class LogSumExp(torch.autograd.Function):
    """logsumexp(x, dim) whose derivatives stay finite when a slice is all -inf.

    The forward value is torch's (already stable: -inf for an all -inf slice);
    the derivative is the softmax of the slice, which we define as 0 on such
    slices instead of torch's NaN (see NOTE [logsumexp of an all -inf slice]).
    That matters for masked inputs (log-probabilities with -inf padding), where
    one fully masked row would otherwise turn the whole JVP or gradient to NaN
    after any later reduction.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dim: int) -> Tensor:
        return torch.logsumexp(x, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor, dim_t: None) -> Tensor:
        x, result = ctx.saved_tensors
        return (_softmax_weights(x, result, ctx.dim) * x_t).sum(ctx.dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, result = ctx.saved_tensors
        return grad.unsqueeze(ctx.dim) * _softmax_weights(x, result, ctx.dim), None


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) without torch's threshold; see :class:`Softplus`."""
    out: Tensor = Softplus.apply(x)
    return out


def logsumexp(x: Tensor, dim: int) -> Tensor:
    """log(sum(exp(x), dim)) with zero derivatives on all -inf slices; see :class:`LogSumExp`."""
    out: Tensor = LogSumExp.apply(x, dim)
    return out


# NOTE [accurate elementwise functions]
# Where PyTorch's float64 value or derivative formula of an expression function
# loses more than 1e-12 relative (bench/accuracy_survey.py measures each one
# against mpmath at 50 digits), the language uses one of the Functions below: the
# value from a form that does not cancel or overflow, the derivative from its own
# formula (``jvp`` and ``backward``), both written with torch operations so
# higher derivatives and vmap work. What each one mends (PyTorch 2.13, float64):
#
# - gelu: ``x/2 (1 + erf(x/sqrt 2))`` cancels for x < -5 (1.8% off at -8, -0.0
#   below -9; its derivative too). Here ``x/2 erfc(-x/sqrt 2)``, no cancellation
#   anywhere, and ``Phi(x) + x phi(x)`` with Phi from erfc.
# - sigmoid: the derivative ``s (1 - s)`` is 0 from x = 37 on (true e**-x) and
#   loses digits from 15; the value underflows to 0 below -709.78 (true ~1e-309).
#   Here ``s(x) s(-x) = e / (1 + e)**2``, ``e = exp(-|x|)``, and e**x below -708.
#   silu (``x sigmoid(x)``, 0 below -709.78 where the true value is ~1e-306) and
#   softplus's derivative use the same sigmoid.
# - tanh: ``1 - tanh**2`` is 0 from |x| = 19 on; here ``4 e / (1 + e)**2``, ``e =
#   exp(-2|x|)``.
# - sinh, cosh: tensors of 16 or more elements (the vectorized kernel) overflow to
#   inf for 709.78 < |x| <= 710.47, where the true value is finite and a tensor of
#   one element gets it. Here ``(exp(|x|/2) / 2) exp(|x|/2)`` there, the same for
#   every length; each is the other's derivative.
# - asin, acos, atanh: ``1 - x**2`` in the derivative cancels near |x| = 1 (2.5e-11
#   off at 1 - 1e-10); here ``(1 - x)(1 + x)``.
# - asinh, acosh: ``x**2 +- 1`` overflows for |x| > 1e154 (derivative 0, true 1/|x|)
#   and cancels near 1 (acosh); here ``1 / hypot(x, 1)`` and
#   ``rsqrt(x - 1) rsqrt(x + 1)``.
# - expm1: the derivative ``expm1(x) + 1`` is 0 below -37 (true e**x); here exp(x).
# - log2, log10: ``x * log(10)`` overflows for x > 7.8e307 (derivative 0); here
#   ``(1 / x) / log(10)``.
# - atan2: ``y**2 + x**2`` in the derivatives overflows or underflows for large and
#   tiny arguments (inf at y = 1e-300, x = 0); here scaled by ``hypot(y, x)``.
# A Function costs one Python call more than the native operator (a few µs; see
# bench/README.md, "Expression functions"); operators outside these keep their
# native kernel, so the ``x**2 + y**2`` path is unchanged.

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_LN2 = 1.0 / math.log(2.0)
_INV_LN10 = 1.0 / math.log(10.0)
_SINH_NATIVE_MAX = 709.0  # below, torch's kernels are exact at every length


_SIGMOID_NATIVE_MIN = -708.0  # above, 1 + exp(-x) is finite and torch.sigmoid exact


def _sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + e**-x), also where e**-x overflows (x < -709.78: then it is e**x itself)."""
    return torch.where(x < _SIGMOID_NATIVE_MIN, torch.exp(x), torch.sigmoid(x))


def _sigmoid_slope(x: Tensor) -> Tensor:
    """sigmoid(x) sigmoid(-x) = e / (1 + e)**2 with e = exp(-|x|): no ``1 - s``."""
    e = torch.exp(-torch.abs(x))
    one_plus = 1 + e
    return e / (one_plus * one_plus)


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * torch.special.erfc(-_SQRT1_2 * x)


def _gelu_derivative(x: Tensor) -> Tensor:
    # Phi(x) + x phi(x). At x = +-inf, inf * 0 is NaN, as in PyTorch's own formula.
    return 0.5 * torch.special.erfc(-_SQRT1_2 * x) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _silu(x: Tensor) -> Tensor:
    return x * _sigmoid(x)


def _silu_derivative(x: Tensor) -> Tensor:
    # sigmoid(x) + x sigmoid(x) sigmoid(-x)
    return _sigmoid(x) + x * _sigmoid_slope(x)


def _tanh_derivative(x: Tensor) -> Tensor:
    e = torch.exp(-2 * torch.abs(x))
    return 4 * e / ((1 + e) * (1 + e))


def _half_exp_squared(x: Tensor) -> Tensor:
    """exp(|x|) / 2 as (exp(|x|/2) / 2) * exp(|x|/2): finite up to |x| = 710.47."""
    h = torch.exp(0.5 * torch.abs(x))
    return (0.5 * h) * h


def _sinh(x: Tensor) -> Tensor:
    big = torch.sign(x) * _half_exp_squared(x)
    return torch.where(torch.abs(x) < _SINH_NATIVE_MAX, torch.sinh(x), big)


def _cosh(x: Tensor) -> Tensor:
    return torch.where(torch.abs(x) < _SINH_NATIVE_MAX, torch.cosh(x), _half_exp_squared(x))


def _one_minus_square(x: Tensor) -> Tensor:
    return (1 - x) * (1 + x)


def _asin_derivative(x: Tensor) -> Tensor:
    return torch.rsqrt(_one_minus_square(x))


def _acos_derivative(x: Tensor) -> Tensor:
    return -torch.rsqrt(_one_minus_square(x))


def _atanh_derivative(x: Tensor) -> Tensor:
    return torch.reciprocal(_one_minus_square(x))


def _asinh_derivative(x: Tensor) -> Tensor:
    return torch.reciprocal(torch.hypot(x, torch.ones_like(x)))


def _acosh_derivative(x: Tensor) -> Tensor:
    return torch.rsqrt(x - 1) * torch.rsqrt(x + 1)


def _log2_derivative(x: Tensor) -> Tensor:
    return torch.reciprocal(x) * _INV_LN2


def _log10_derivative(x: Tensor) -> Tensor:
    return torch.reciprocal(x) * _INV_LN10


def _elementwise(
    name: str, value: Callable[[Tensor], Tensor], derivative: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """``value`` as a function whose JVP and VJP multiply by ``derivative(x)``."""

    def forward(x: Tensor) -> Tensor:
        return value(x)

    def jvp(ctx: Any, x_t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return derivative(x) * x_t

    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * derivative(x)

    function: Any = type(
        name,
        (_SavesInputs,),
        {
            "forward": staticmethod(forward),
            "jvp": staticmethod(jvp),
            "backward": staticmethod(backward),
            "__doc__": f"{name.lower()}: NOTE [accurate elementwise functions]",
            "__module__": __name__,
        },
    )

    def apply(x: Tensor) -> Tensor:
        out: Tensor = function.apply(x)
        return out

    apply.__name__ = name.lower()
    apply.__qualname__ = name.lower()
    return apply


sigmoid = _elementwise("Sigmoid", _sigmoid, _sigmoid_slope)

ACCURATE: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _elementwise("Gelu", _gelu, _gelu_derivative),
    "sigmoid": sigmoid,
    "silu": _elementwise("Silu", _silu, _silu_derivative),
    "tanh": _elementwise("Tanh", torch.tanh, _tanh_derivative),
    "sinh": _elementwise("Sinh", _sinh, _cosh),
    "cosh": _elementwise("Cosh", _cosh, _sinh),
    "asin": _elementwise("Asin", torch.asin, _asin_derivative),
    "acos": _elementwise("Acos", torch.acos, _acos_derivative),
    "atanh": _elementwise("Atanh", torch.atanh, _atanh_derivative),
    "asinh": _elementwise("Asinh", torch.asinh, _asinh_derivative),
    "acosh": _elementwise("Acosh", torch.acosh, _acosh_derivative),
    "expm1": _elementwise("Expm1", torch.expm1, torch.exp),
    "log2": _elementwise("Log2", torch.log2, _log2_derivative),
    "log10": _elementwise("Log10", torch.log10, _log10_derivative),
    "softplus": softplus,
}
"""Expression function name -> its accurate form (NOTE [accurate elementwise functions])."""


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class Atan2(_SavesInputs):
    """atan2(y, x) with derivatives scaled by hypot(y, x): no overflow or underflow
    of ``y**2 + x**2`` (NOTE [accurate elementwise functions])."""

    @staticmethod
    def forward(y: Tensor, x: Tensor) -> Tensor:
        return torch.atan2(y, x)

    @staticmethod
    def _partials(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.hypot(y, x)
        return (x / h) / h, -(y / h) / h

    @staticmethod
    def jvp(ctx: Any, y_t: Tensor | None, x_t: Tensor | None) -> Tensor:
        y, x = ctx.saved_tensors
        dy, dx = Atan2._partials(y, x)
        out = torch.zeros_like(torch.atan2(y, x))
        if y_t is not None:
            out = out + dy * y_t
        if x_t is not None:
            out = out + dx * x_t
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        y, x = ctx.saved_tensors
        dy, dx = Atan2._partials(y, x)
        return _sum_to(grad * dy, y.shape), _sum_to(grad * dx, x.shape)


def atan2(y: Tensor, x: Tensor) -> Tensor:
    """The angle of the point (x, y); see :class:`Atan2`."""
    out: Tensor = Atan2.apply(y, x)
    return out
