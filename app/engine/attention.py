"""Scaled dot-product attention as a custom autograd Function with its own ``jvp()``.

# NOTE [attention without fused kernels]
`torch.nn.functional.scaled_dot_product_attention` dispatches to fused kernels
(flash, memory-efficient, and on the CPU ``_scaled_dot_product_flash_attention_for_cpu``)
that have no forward-AD formula: a JVP through them fails with "Trying to use
forward AD with _scaled_dot_product_flash_attention_for_cpu that does not
support it". `Attention` computes the same function with matmul and softmax and
states both derivatives by hand, so JVPs (and VJPs, and VJPs of VJPs: the
backward is written in differentiable operations) work on every device.

With ``S = scale * q @ k^T``, ``P = softmax(S)`` (over the last dimension) and
``O = P @ v``:

- forward (J·v):  ``dS = scale * (dq @ k^T + q @ dk^T)``,
  ``dP = P * (dS - sum(P * dS, -1))``, ``dO = dP @ v + P @ dv``;
- backward (u^T J): ``gv = P^T @ gO``, ``gP = gO @ v^T``,
  ``gS = P * (gP - sum(P * gP, -1))``, ``gq = scale * gS @ k``, ``gk = scale * gS^T @ q``.

``P`` is recomputed in ``jvp()`` and ``backward()`` from the saved inputs rather
than saved: it is the largest tensor and cheap to recompute.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)


class Attention(torch.autograd.Function):
    """``softmax(scale * q @ k^T) @ v``; q ``[..., L, E]``, k and v ``[..., S, E]``."""

    generate_vmap_rule = True  # so torch.func.vmap (dynamic batching) can batch it

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return _probabilities(q, k, scale) @ v

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        q, k, v, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def jvp(
        ctx: Any,
        dq: torch.Tensor | None,
        dk: torch.Tensor | None,
        dv: torch.Tensor | None,
        _dscale: None,
    ) -> torch.Tensor:
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        p = _probabilities(q, k, scale)
        out = torch.zeros_like(p @ v)
        if dq is not None or dk is not None:
            ds = torch.zeros_like(p)
            if dq is not None:
                ds = ds + dq @ k.transpose(-2, -1)
            if dk is not None:
                ds = ds + q @ dk.transpose(-2, -1)
            ds = ds * scale
            dp = p * (ds - (p * ds).sum(-1, keepdim=True))
            out = out + dp @ v
        if dv is not None:
            out = out + p @ dv
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        p = _probabilities(q, k, scale)
        grad_v = p.transpose(-2, -1) @ grad_out if ctx.needs_input_grad[2] else None
        grad_q = grad_k = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_p = grad_out @ v.transpose(-2, -1)
            grad_s = p * (grad_p - (p * grad_p).sum(-1, keepdim=True)) * scale
            if ctx.needs_input_grad[0]:
                grad_q = grad_s @ k
            if ctx.needs_input_grad[1]:
                grad_k = grad_s.transpose(-2, -1) @ q
        return grad_q, grad_k, grad_v, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """`Attention` with PyTorch's default scale ``1 / sqrt(E)``.

    Example:
        >>> q = torch.randn(2, 4, 8, dtype=torch.float64)
        >>> ref = torch.softmax(q @ q.transpose(-2, -1) / 8**0.5, -1) @ q
        >>> torch.allclose(attention(q, q, q), ref)
        True
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out: torch.Tensor = Attention.apply(q, k, v, scale)
    return out
