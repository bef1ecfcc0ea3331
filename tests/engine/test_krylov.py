"""The Krylov methods of app/engine/krylov.py, alone, against numpy and SciPy on small
dense systems."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from app.engine.krylov import NonFinite, bicgstab, cg, gmres, lsmr

F64 = torch.float64


def system(n: int, seed: int, shift: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=F64) + shift * torch.eye(n, dtype=F64)
    return a, torch.randn(n, generator=g, dtype=F64)


@pytest.mark.parametrize("n", [1, 2, 7, 40])
@pytest.mark.parametrize("restart", [5, 50])
def test_gmres_matches_numpy_solve(n: int, restart: int) -> None:
    a, b = system(n, seed=n)
    r = gmres(lambda v: a @ v, b, rtol=1e-12, restart=restart, maxiter=2000)
    ref = np.linalg.solve(a.numpy(), b.numpy())
    assert r.converged
    np.testing.assert_allclose(r.x.numpy(), ref, rtol=0, atol=1e-10)
    assert r.residual_norm == pytest.approx(float(np.linalg.norm(b - a @ r.x)), abs=1e-12)


def test_gmres_without_restart_takes_at_most_n_products_plus_the_residual() -> None:
    a, b = system(12, seed=3, shift=0.0)  # nonsymmetric, not diagonally dominant
    r = gmres(lambda v: a @ v, b, rtol=1e-10, restart=12, maxiter=100)
    assert r.converged and r.iterations <= 13
    np.testing.assert_allclose(r.x.numpy(), np.linalg.solve(a.numpy(), b.numpy()), atol=1e-8)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_bicgstab_matches_numpy_solve(n: int) -> None:
    a, b = system(n, seed=10 + n)
    r = bicgstab(lambda v: a @ v, b, rtol=1e-12, maxiter=1000)
    assert r.converged
    np.testing.assert_allclose(r.x.numpy(), np.linalg.solve(a.numpy(), b.numpy()), atol=1e-10)


@pytest.mark.parametrize("n", [1, 6, 40])
def test_cg_matches_numpy_solve_on_spd(n: int) -> None:
    a, b = system(n, seed=20 + n, shift=0.0)
    spd = a @ a.T + torch.eye(n, dtype=F64)
    r = cg(lambda v: spd @ v, b, rtol=1e-12, maxiter=1000)
    assert r.converged
    np.testing.assert_allclose(r.x.numpy(), np.linalg.solve(spd.numpy(), b.numpy()), atol=1e-9)


def test_cg_on_an_indefinite_matrix_stops_with_a_reason() -> None:
    a, b = system(8, seed=1)
    negative = -(a @ a.T)
    r = cg(lambda v: negative @ v, b, rtol=1e-12, maxiter=100)
    assert not r.converged
    assert r.reason is not None and "symmetric positive definite" in r.reason


@pytest.mark.parametrize("solver", [gmres, bicgstab, cg])
def test_zero_rhs_gives_zero_without_products(solver: object) -> None:
    a, _ = system(4, seed=2)
    r = solver(lambda v: a @ v, torch.zeros(4, dtype=F64), rtol=1e-10, maxiter=10)  # type: ignore[operator]
    assert r.converged and r.iterations == 0 and not r.x.any()


@pytest.mark.parametrize("solver", [gmres, bicgstab, cg])
def test_product_cap_is_kept_and_reported_unconverged(solver: object) -> None:
    a, b = system(60, seed=4, shift=0.5)
    spd = a @ a.T + 1e-3 * torch.eye(60, dtype=F64)  # ill-conditioned: 5 products are too few
    r = solver(lambda v: spd @ v, b, rtol=1e-14, maxiter=5)  # type: ignore[operator]
    assert not r.converged
    assert r.iterations <= 5 + 1  # GMRES's closing residual is one more product


@pytest.mark.parametrize("solver", [gmres, bicgstab, cg])
def test_nonfinite_product_raises(solver: object) -> None:
    b = torch.ones(3, dtype=F64)
    with pytest.raises(NonFinite):
        solver(lambda v: v * float("nan"), b, rtol=1e-8, maxiter=10)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("m", "n", "damp"), [(60, 20, 0.0), (60, 20, 0.7), (15, 30, 0.0), (9, 9, 0.1)]
)
def test_lsmr_matches_scipy_lsmr(m: int, n: int, damp: float) -> None:
    g = torch.Generator().manual_seed(m * 100 + n)
    a = torch.randn(m, n, generator=g, dtype=F64)
    b = torch.randn(m, generator=g, dtype=F64)
    r = lsmr(
        lambda v: a @ v, lambda u: a.T @ u, b, n, damp=damp, atol=1e-12, btol=1e-12, maxiter=500
    )
    ref = sla.lsmr(a.numpy(), b.numpy(), damp=damp, atol=1e-12, btol=1e-12, maxiter=500)
    np.testing.assert_allclose(r.x.numpy(), ref[0], atol=1e-9)
    assert r.residual_norm == pytest.approx(ref[3], rel=1e-8, abs=1e-10)
    assert r.converged
    if damp == 0.0 and m >= n:  # the least-squares solution itself
        lstsq = np.linalg.lstsq(a.numpy(), b.numpy(), rcond=None)[0]
        np.testing.assert_allclose(r.x.numpy(), lstsq, atol=1e-9)
    assert r.rmatvecs == r.iterations + 1 or r.rmatvecs == r.iterations


def test_lsmr_zero_rhs() -> None:
    a = torch.eye(3, dtype=F64)
    r = lsmr(lambda v: a @ v, lambda u: a.T @ u, torch.zeros(3, dtype=F64), 3)
    assert r.converged and not r.x.any() and r.iterations == 0


def test_gmres_on_a_singular_matrix_says_so() -> None:
    singular = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    r = gmres(lambda v: singular @ v, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-10, maxiter=10)
    assert not r.converged and r.reason is not None and "singular" in r.reason
    assert bool(torch.isfinite(r.x).all())


@pytest.mark.parametrize("scale", [1e-320, 1e-200, 1e-163, 1e-150, 1.0, 1e150, 1e200, 1e300])
def test_norm2_neither_underflows_nor_overflows(scale: float) -> None:
    """Against math.hypot (Python's correctly scaled n-dimensional hypot)."""
    from app.engine.krylov import norm2

    values = [scale * c for c in (3.0, -4.0, 0.5, 1e-3, 0.0)]
    v = torch.tensor(values, dtype=torch.float64)
    assert norm2(v) == pytest.approx(math.hypot(*values), rel=1e-15)
    assert norm2(torch.zeros(3, dtype=torch.float64)) == 0.0
    assert norm2(torch.zeros(0, dtype=torch.float64)) == 0.0
    assert norm2(torch.tensor([1.0, math.inf], dtype=torch.float64)) == math.inf
    assert math.isnan(norm2(torch.tensor([1.0, math.nan], dtype=torch.float64)))


def test_a_solve_near_a_root_at_minus_infinity_reports_its_true_residual() -> None:
    """exp(u) = 0 from u = 0: each Newton step is -1, so ||f|| = sqrt(n) e^-k; the squares of
    f underflow long before tol 1e-200, and the solve must not read that as ||f|| = 0."""
    from app.engine.solve import SolveOperation, SolveOptions
    from app.engine.target import Materialized

    n = 64
    exp = Materialized(fn=lambda a, s: (torch.exp(a[0]),), parameters={}, buffers={})
    options = SolveOptions(method="newton_krylov", tol=1e-200, max_iterations=2000)
    op = SolveOperation((0,), ("u",), options)
    (f,), (u,) = op(exp, (torch.zeros(n, dtype=torch.float64),), (None,), {})
    report = op.report()
    true_norm = math.hypot(*f.tolist())
    assert report["converged"] is True
    assert 0 < true_norm <= 1e-200
    assert report["residual_norm"] == pytest.approx(true_norm, rel=1e-12)
    k = math.ceil(200 * math.log(10) + 0.5 * math.log(n))  # the first k with sqrt(n) e^-k <= tol
    assert report["iterations"] == k
    torch.testing.assert_close(u, torch.full((n,), -float(k), dtype=torch.float64))
