"""client.linear_operator and client.least_squares_jac against the real server (in-process):
SciPy's solvers on the service's Jacobian, compared with numpy on the /jacobian matrix."""

from __future__ import annotations

import numpy as np
import pytest
import test_live

pytest.importorskip("scipy")
from scipy.optimize import least_squares  # noqa: E402
from scipy.sparse.linalg import cg, eigsh, gmres, lgmres, lsmr, lsqr, svds  # noqa: E402

from jvp_client import JVPClient  # noqa: E402
from jvp_client.scipy import JacobianOperator  # noqa: E402

asgi = test_live.asgi


def _jacobian(client: JVPClient, **kw: object) -> np.ndarray:
    """The dense J from POST /jacobian, as (output elements, wrt elements)."""
    result = client.jacobian(**kw)  # type: ignore[arg-type]
    blocks = result.jacobian
    assert isinstance(blocks, dict)
    out = np.asarray(result.output)
    return np.concatenate([np.asarray(b).reshape(out.size, -1) for b in blocks.values()], axis=1)


def _mlp_point() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((1, 64)) * 0.1}


def test_linear_operator_gmres_matches_solve(asgi: JVPClient) -> None:
    primals = _mlp_point()
    dense = _jacobian(asgi, model="mlp", primals=primals, dtype="float64")
    b = np.random.default_rng(1).standard_normal(64)
    with asgi.linear_operator(model="mlp", primals=primals, wrt="x", dtype="float64") as J:
        assert isinstance(J, JacobianOperator)
        assert J.shape == (64, 64) and J.dtype == np.float64
        np.testing.assert_allclose(J @ np.eye(64), dense, rtol=1e-10, atol=1e-12)  # matmat
        np.testing.assert_allclose(J.T @ np.eye(64), dense.T, rtol=1e-10, atol=1e-12)
        # cond(J) is about 950 here: full GMRES (restart = n) solves it in n steps.
        delta, info = gmres(J, b, rtol=1e-10, restart=64, maxiter=2)
        assert info == 0
        np.testing.assert_allclose(delta, np.linalg.solve(dense, b), rtol=1e-6, atol=1e-8)
        delta, info = lgmres(J, b, rtol=1e-10, inner_m=64, maxiter=3)
        assert info == 0
        np.testing.assert_allclose(delta, np.linalg.solve(dense, b), rtol=1e-6, atol=1e-8)


A = np.random.default_rng(2).standard_normal((8, 3))
TALL = "tanh(A @ x) + 0.5 * A @ x"


def test_linear_operator_lsmr_lsqr_on_a_tall_jacobian(asgi: JVPClient) -> None:
    primals = {"A": A, "x": np.array([0.3, -0.2, 0.1])}
    dense = _jacobian(asgi, expression=TALL, primals=primals, wrt=["x"], dtype="float64")
    b = np.random.default_rng(3).standard_normal(8)
    expected = np.linalg.lstsq(dense, b, rcond=None)[0]
    with asgi.linear_operator(expression=TALL, primals=primals, wrt="x") as J:
        assert J.shape == (8, 3)
        for solve in (lsmr, lsqr):
            got = solve(J, b, atol=1e-12, btol=1e-12)[0]
            np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_linear_operator_eigsh_cg_svds_of_jtj(asgi: JVPClient) -> None:
    primals = _mlp_point()
    dense = _jacobian(asgi, model="mlp", primals=primals, dtype="float64")
    gram = dense.T @ dense
    with asgi.linear_operator(model="mlp", primals=primals, wrt="x", dtype="float64") as J:
        JtJ = J.T @ J
        values = eigsh(JtJ, k=3, which="LM", return_eigenvectors=False)
        np.testing.assert_allclose(
            np.sort(values), np.sort(np.linalg.eigvalsh(gram))[-3:], rtol=1e-8
        )
        singular = svds(J, k=3, return_singular_vectors=False)
        np.testing.assert_allclose(
            np.sort(singular), np.sort(np.linalg.svd(dense, compute_uv=False))[-3:], rtol=1e-8
        )
        b = np.random.default_rng(4).standard_normal(64)
        x, info = cg(JtJ, b, rtol=1e-10, maxiter=2000)
        assert info == 0
        np.testing.assert_allclose(gram @ x, b, rtol=1e-6, atol=1e-6)


def test_linear_operator_renews_an_expired_session(asgi: JVPClient) -> None:
    primals = {"A": A, "x": np.array([0.3, -0.2, 0.1])}
    dense = _jacobian(asgi, expression=TALL, primals=primals, wrt=["x"], dtype="float64")
    J = asgi.linear_operator(expression=TALL, primals=primals, wrt="x")
    first = J.session.id
    J.session.close()  # as if it expired: the service answers 404 for it
    v = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(J @ v, dense @ v, rtol=1e-12)
    assert J.session.id != first
    u = np.arange(8.0)
    np.testing.assert_allclose(J.T @ u, dense.T @ u, rtol=1e-12)
    J.close()


def test_least_squares_fits_parameters(asgi: JVPClient) -> None:
    t = np.linspace(0.0, 3.0, 20)
    truth = {"a": 2.0, "b": 1.3, "c": 0.5}
    observed = truth["a"] * np.exp(-truth["b"] * t) + truth["c"]
    problem = asgi.least_squares_jac(
        expression="a * exp(-b * t) + c",
        primals={"t": t, "a": np.array(1.0), "b": np.array(0.5), "c": np.array(0.0)},
        wrt=["a", "b", "c"],
        observed=observed,
        dtype="float64",
    )
    fit = least_squares(problem.fun, problem.x0, jac=problem.jac, tr_solver="lsmr")
    problem.close()
    assert fit.success
    np.testing.assert_allclose(fit.x, [truth["a"], truth["b"], truth["c"]], rtol=1e-6)
