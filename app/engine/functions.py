"""Custom autograd Functions where a hand-written derivative beats torch's own.

Each class defines ``forward``/``setup_context`` (the style that
``torch.func`` needs), a forward-mode ``jvp`` and a reverse-mode ``backward``,
and sets ``generate_vmap_rule = True`` so it also works under ``torch.func.vmap``
(the dynamic batcher vmaps over the JVP).

``jvp`` and ``backward`` are written with ordinary torch ops on the saved
tensors, so they are themselves differentiable (higher-order derivatives work).

    >>> import torch
    >>> x = torch.tensor([30.0], dtype=torch.float64)
    >>> bool(softplus(x) > 30.0)  # torch.nn.functional.softplus returns exactly 30.0
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["LogSumExp", "Softplus", "logsumexp", "softplus"]


class Softplus(torch.autograd.Function):
    """softplus(x) = log(1 + exp(x)), computed as relu(x) + log1p(exp(-|x|)).

    Why not ``torch.nn.functional.softplus``: it returns ``x`` itself once
    ``x > threshold`` (20 by default), dropping ``log1p(exp(-x))``, which is
    about 2e-9 at x = 20 and well above float64 resolution up to x ~ 36; its
    derivative there is exactly 1 instead of sigmoid(x). This form has no
    threshold, never overflows (exp only sees non-positive arguments) and is
    accurate to a few ulp over the whole line. The derivative is sigmoid(x),
    so the JVP is ``sigmoid(x) * t``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.sigmoid(x) * x_t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


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
