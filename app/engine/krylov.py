"""Krylov methods on torch tensors, on the tensors' own device: GMRES with restarts,
BiCGSTAB, CG and LSMR, each driven by a matrix-free product (``matvec``: v -> J v, and for
LSMR ``rmatvec``: u -> Jᵀ u) on flat 1-D vectors.

# NOTE [Krylov methods written here]
Looked at first (issue 18): SciPy's solvers (numpy on the host: every product would be
a copy off the device and back), GPyTorch's linear_operator (CG and MINRES for symmetric
positive definite kernel matrices only: no GMRES, BiCGSTAB or LSMR), cola-ml (pre-1.0,
its solvers behind its own LinearOperator types and plum dispatch), the `krylov` package
(numpy only). None gives the four methods on torch tensors on the GPU with a product
that is a Python callable, so they are written once here, torch only, after the
references named on each. The vectors stay on the device; the small matrices and
scalars of the recurrences (GMRES's Hessenberg matrix and rotations, LSMR's rotations)
are host floats, one synchronization per iteration, which the convergence test needs
anyway.

Every method counts its products, stops at its cap (``maxiter``: products of J) and
says whether it met its tolerance; a non-finite product raises `NonFinite`, which the
solve loop turns into ``converged: false`` with a reason.

    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> r = gmres(lambda v: a @ v, b, rtol=1e-12, maxiter=10)
    >>> [round(v, 6) for v in r.x.tolist()], r.converged
    ([0.090909, 0.636364], True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


class NonFinite(Exception):
    """A product J v (or Jᵀ u) held a NaN or an infinity."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass
class KrylovResult:
    x: torch.Tensor
    iterations: int  # products of J (GMRES: restart residuals included)
    converged: bool
    residual_norm: float  # ||b - A x|| (LSMR: its estimate of ||b - A x||)
    rmatvecs: int = 0  # LSMR's products of Jᵀ
    reason: str | None = None  # why it stopped short: a breakdown, J not SPD (CG)


# Past these magnitudes the squares in a 2-norm underflow into subnormals or overflow.
_SQUARES_SAFE = (1e-150, 1e150)


def norm2(v: torch.Tensor) -> float:
    """||v||₂ without the underflow and overflow of its squares.

    `torch.linalg.vector_norm` sums the squares as they are: every element about 1e-163
    (exp(u) near a root at -inf) gave 0.0, a solve "converged" with ||f|| reported 0 at
    4e-160, and elements about 1e200 gave inf, a finite f taken for an infinite one. Outside
    the magnitudes whose squares are normal numbers, the vector is scaled by its largest
    element first (as LAPACK's dnrm2 scales)."""
    biggest = float(v.abs().max()) if v.numel() else 0.0
    if _SQUARES_SAFE[0] <= biggest <= _SQUARES_SAFE[1]:
        return float(torch.linalg.vector_norm(v))
    if biggest == 0.0 or not math.isfinite(biggest):
        return biggest
    return biggest * float(torch.linalg.vector_norm(v / biggest))


def _checked(matvec: Matvec, what: str) -> Matvec:
    def apply(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v)
        if not bool(torch.isfinite(out).all()):
            raise NonFinite(what)
        return out

    return apply


class _Start(NamedTuple):
    a: Matvec  # the checked product
    x: torch.Tensor  # the first iterate
    r: torch.Tensor  # its residual b - J x
    target: float  # the residual norm that counts as converged
    products: int  # products spent so far (one for a given x0)


def krylov(
    method: str,
    matvec: Matvec,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    rtol: float = 1e-8,
    atol: float = 0.0,
    maxiter: int = 200,
    restart: int = 50,
) -> KrylovResult:
    """x with ||b - A x|| <= max(rtol ||b||, atol) by ``method`` (a key of `METHODS`), in at
    most ``maxiter`` products; ``restart``: GMRES's products between restarts (the other
    methods have none). Each begins at x0 (zero when not given) and its residual."""
    a = _checked(matvec, "J·v")
    target = max(rtol * norm2(b), atol)
    if x0 is None:
        start = _Start(a, torch.zeros_like(b), b, target, 0)
    else:
        x = x0.clone()
        start = _Start(a, x, b - a(x), target, 1)
    return METHODS[method](start, b, maxiter, restart)


# NOTE [GMRES]
# Restarted GMRES (Saad and Schultz 1986; Saad, "Iterative Methods for Sparse Linear
# Systems", 2nd ed., Algorithm 6.9): Arnoldi with classical Gram-Schmidt done twice
# (CGS2: two matrix-vector passes over the basis instead of j dot products, as
# accurate as modified Gram-Schmidt), Givens rotations on the Hessenberg matrix so the
# residual norm is known every iteration without forming x, and a restart every
# ``restart`` products (x formed, its true residual computed with one more product).
# Over 60 lines: the Arnoldi step and the rotations share the recurrence's state.
# A long function on purpose: GMRES's Arnoldi step, Givens rotations and restart test are
# one loop whose state (H, the rotations, the residual estimate) the steps share; split,
# they would pass that state back and forth and read less like the published algorithm.
def _gmres(start: _Start, b: torch.Tensor, maxiter: int, restart: int) -> KrylovResult:
    """Restarted GMRES from ``start`` (NOTE [GMRES])."""
    a, x, r, target, products = start
    n = b.numel()
    beta = norm2(r)
    tiny = torch.finfo(b.dtype).tiny
    singular = False
    while beta > target and products < maxiter and not singular:
        m = max(1, min(restart, maxiter - products, n))
        basis = torch.empty((m + 1, n), dtype=b.dtype, device=b.device)
        basis[0] = r / beta
        h = [[0.0] * m for _ in range(m + 1)]  # h[i][j], Hessenberg (host floats)
        cs, sn = [0.0] * m, [0.0] * m
        g = [0.0] * (m + 1)
        g[0] = beta
        k = 0
        for j in range(m):
            w = a(basis[j])
            products += 1
            v = basis[: j + 1]
            coeffs = v @ w
            w = w - v.T @ coeffs
            again = v @ w
            w = w - v.T @ again
            column = (coeffs + again).tolist()
            below = norm2(w)
            for i in range(j):  # the earlier rotations, on the new column
                hi, hn = column[i], column[i + 1]
                column[i] = cs[i] * hi + sn[i] * hn
                column[i + 1] = -sn[i] * hi + cs[i] * hn
            diag = math.hypot(column[j], below)
            if diag == 0.0:  # J maps the new basis vector into the old ones' span: singular
                singular = True
                break
            cs[j], sn[j] = column[j] / diag, below / diag
            column[j] = diag
            for i in range(j + 1):
                h[i][j] = column[i]
            g[j + 1] = -sn[j] * g[j]
            g[j] = cs[j] * g[j]
            k = j + 1
            if below > tiny:
                basis[j + 1] = w / below
            if abs(g[j + 1]) <= target or below <= tiny:  # converged, or the happy breakdown
                break
        if k == 0:
            break
        upper = torch.tensor([row[:k] for row in h[:k]], dtype=torch.float64)
        rhs = torch.tensor(g[:k], dtype=torch.float64).unsqueeze(1)
        y = torch.linalg.solve_triangular(upper, rhs, upper=True).squeeze(1)
        x = x + basis[:k].T @ y.to(dtype=b.dtype, device=b.device)
        r = b - a(x)
        products += 1
        beta = norm2(r)
        if k < m and beta > target and abs(g[k]) > target:
            break  # a breakdown without convergence: restarting would repeat it
    converged = beta <= target
    reason = None
    if not converged and (singular or products < maxiter):
        reason = "GMRES broke down: J is singular on the Krylov space (J v = 0 for some v in it)"
    return KrylovResult(x, products, converged, beta, reason=reason)


def _bicgstab(start: _Start, b: torch.Tensor, maxiter: int, restart: int) -> KrylovResult:
    """BiCGSTAB (van der Vorst 1992; Saad, Algorithm 7.7): two products per iteration."""
    a, x, r, target, products = start
    shadow = r.clone()
    rho = alpha = omega = 1.0
    v = p = torch.zeros_like(b)
    norm_r = norm2(r)
    reason = None
    while norm_r > target and products + 2 <= maxiter:
        rho_new = float(shadow @ r)
        if rho_new == 0.0 or omega == 0.0:
            reason = "BiCGSTAB broke down (rho or omega is 0)"
            break
        beta = (rho_new / rho) * (alpha / omega)
        p = r + beta * (p - omega * v)
        v = a(p)
        products += 1
        denominator = float(shadow @ v)
        if denominator == 0.0:
            reason = "BiCGSTAB broke down (r̂·Jp is 0)"
            break
        alpha = rho_new / denominator
        s = r - alpha * v
        if norm2(s) <= target:
            x = x + alpha * p
            r = s
            norm_r = norm2(s)
            break
        t = a(s)
        products += 1
        tt = float(t @ t)
        omega = float(t @ s) / tt if tt > 0.0 else 0.0
        x = x + alpha * p + omega * s
        r = s - omega * t
        norm_r = norm2(r)
        rho = rho_new
    return KrylovResult(x, products, norm_r <= target, norm_r, reason=reason)


def _cg(start: _Start, b: torch.Tensor, maxiter: int, restart: int) -> KrylovResult:
    """Conjugate gradients (Hestenes and Stiefel 1952) for a symmetric positive definite
    J; stops with a reason where p·Jp <= 0 shows J is not."""
    a, x, r, target, products = start
    p = r.clone()
    rr = float(r @ r)
    reason = None
    while math.sqrt(rr) > target and products < maxiter:
        q = a(p)
        products += 1
        curvature = float(p @ q)
        if curvature <= 0.0:
            reason = (
                f"CG needs a symmetric positive definite J, but p·Jp = {curvature:.3g} <= 0 "
                "for a search direction p; use gmres or bicgstab"
            )
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * q
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    norm_r = math.sqrt(rr)
    return KrylovResult(x, products, norm_r <= target, norm_r, reason=reason)


def _sym_ortho(a: float, b: float) -> tuple[float, float, float]:
    """A stable Givens rotation (c, s, r) with [c s; -s c] [a; b] = [r; 0]."""
    if b == 0.0:
        return math.copysign(1.0, a) if a else 1.0, 0.0, abs(a)
    if a == 0.0:
        return 0.0, math.copysign(1.0, b), abs(b)
    if abs(b) > abs(a):
        tau = a / b
        s = math.copysign(1.0, b) / math.sqrt(1.0 + tau * tau)
        return s * tau, s, b / s
    tau = b / a
    c = math.copysign(1.0, a) / math.sqrt(1.0 + tau * tau)
    return c, c * tau, a / c


# NOTE [LSMR]
# LSMR (Fong and Saunders, "LSMR: an iterative algorithm for sparse least-squares
# problems", SIAM J. Sci. Comput. 33(5), 2011): min ||A x - b||² + damp² ||x||² by
# Golub-Kahan bidiagonalization, one product with A and one with Aᵀ per iteration; the
# recurrences and stopping tests follow the paper's Algorithm 3 and its estimates of
# ||r||, ||Aᵀr||, ||A|| and cond(A) (SciPy's scipy.sparse.linalg.lsmr uses the same
# ones, so the two agree iterate for iterate, which tests/engine/test_krylov.py checks).
# Over 60 lines: one recurrence with a dozen coupled scalars; split, it would be harder
# to check against the paper.
# A long function on purpose: LSMR's bidiagonalization and its two sets of plane rotations
# are one recurrence (Fong and Saunders, SIAM J. Sci. Comput. 2011) kept in one place.
def lsmr(
    matvec: Matvec,
    rmatvec: Matvec,
    b: torch.Tensor,
    n: int,
    *,
    damp: float = 0.0,
    atol: float = 1e-8,
    btol: float = 1e-8,
    conlim: float = 1e8,
    maxiter: int = 200,
) -> KrylovResult:
    """x (``n`` elements) minimizing ||A x - b||² + damp² ||x||²."""
    a, at = _checked(matvec, "J·v"), _checked(rmatvec, "Jᵀ·u")
    products = rproducts = 0
    x = b.new_zeros(n)
    u = b
    normb = beta = norm2(b)
    if beta == 0.0:
        return KrylovResult(x, 0, True, 0.0)
    u = u / beta
    v = at(u)
    rproducts += 1
    alpha = norm2(v)
    if alpha > 0.0:
        v = v / alpha
    else:
        return KrylovResult(x, 0, True, beta)  # Aᵀb = 0: x = 0 is a least-squares solution
    zetabar, alphabar, rho, rhobar, cbar, sbar = alpha * beta, alpha, 1.0, 1.0, 1.0, 0.0
    h, hbar = v.clone(), torch.zeros_like(v)
    betadd, betad, rhodold, tautildeold, thetatilde, zeta, d = beta, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0
    norm_a2 = alpha * alpha
    maxrbar, minrbar = 0.0, 1e100
    ctol = 1.0 / conlim if conlim > 0 else 0.0
    normr, stop = beta, 0
    while products < maxiter:
        u = a(v) - alpha * u
        products += 1
        beta = norm2(u)
        if beta > 0.0:
            u = u / beta
            v = at(u) - beta * v
            rproducts += 1
            alpha = norm2(v)
            if alpha > 0.0:
                v = v / alpha
        chat, shat, alphahat = _sym_ortho(alphabar, damp)
        rhoold = rho
        c, s, rho = _sym_ortho(alphahat, beta)
        thetanew, alphabar = s * alpha, c * alpha
        rhobarold, zetaold = rhobar, zeta
        thetabar, rhotemp = sbar * rho, cbar * rho
        cbar, sbar, rhobar = _sym_ortho(cbar * rho, thetanew)
        zeta = cbar * zetabar
        zetabar = -sbar * zetabar
        hbar = h - (thetabar * rho / (rhoold * rhobarold)) * hbar
        x = x + (zeta / (rho * rhobar)) * hbar
        h = v - (thetanew / rho) * h
        # ||r|| estimate
        betaacute, betacheck = chat * betadd, -shat * betadd
        betahat, betadd = c * betaacute, -s * betaacute
        thetatildeold = thetatilde
        ctildeold, stildeold, rhotildeold = _sym_ortho(rhodold, thetabar)
        thetatilde, rhodold = stildeold * rhobar, ctildeold * rhobar
        betad = -stildeold * betad + ctildeold * betahat
        tautildeold = (zetaold - thetatildeold * tautildeold) / rhotildeold
        taud = (zeta - thetatilde * tautildeold) / rhodold
        d += betacheck * betacheck
        normr = math.sqrt(d + (betad - taud) ** 2 + betadd * betadd)
        # ||A|| and cond(A) estimates
        norm_a2 += beta * beta
        norm_a = math.sqrt(norm_a2)
        norm_a2 += alpha * alpha
        maxrbar = max(maxrbar, rhobarold)
        if products > 1:
            minrbar = min(minrbar, rhobarold)
        cond_a = max(maxrbar, rhotemp) / min(minrbar, rhotemp)
        normar, normx = abs(zetabar), norm2(x)
        test1 = normr / normb
        test2 = normar / (norm_a * normr) if norm_a * normr != 0.0 else math.inf
        test3 = 1.0 / cond_a
        t1 = test1 / (1.0 + norm_a * normx / normb)
        rtol = btol + atol * norm_a * normx / normb
        if 1.0 + test3 <= 1.0 or test3 <= ctol:
            stop = 3  # ill-conditioned past conlim (or machine precision)
        if 1.0 + test2 <= 1.0 or test2 <= atol:
            stop = 2  # a least-squares solution: ||Aᵀr|| small
        if 1.0 + t1 <= 1.0 or test1 <= rtol:
            stop = 1  # a solution of A x = b
        if stop:
            break
    return KrylovResult(x, products, stop in (1, 2), normr, rmatvecs=rproducts)


#: How each method iterates from its start; `krylov` begins every one the same way.
METHODS: dict[str, Callable[[_Start, torch.Tensor, int, int], KrylovResult]] = {
    "gmres": _gmres,
    "bicgstab": _bicgstab,
    "cg": _cg,
}
# The methods by name, with `krylov`'s arguments (``restart`` is GMRES's alone).
gmres = partial(krylov, "gmres")
bicgstab = partial(krylov, "bicgstab")
cg = partial(krylov, "cg")
