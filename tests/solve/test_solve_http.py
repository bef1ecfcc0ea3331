"""POST /solve through HTTP: the 2-D Bratu problem against SciPy's newton_krylov, linear
solves against numpy.linalg.solve on the /jacobian matrix, a least-squares fit, and every
way a solve stops short or is refused."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from scipy.optimize import newton_krylov

from tests.conftest import make_client
from tests.solve.bratu import LAMBDA, N, export, residual


def wire(values: Any) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"shape": list(a.shape), "dtype": "float64", "data": a.reshape(-1).tolist()}


def array(tensor: dict[str, Any]) -> np.ndarray:
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])


class TwoOutputs(torch.nn.Module):
    """f(u) = (2 u[:2] - 1, u[2:]² - 4): two outputs, three elements in all, as u has."""

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 2.0 * u[:2] - 1.0, u[2:] ** 2 - 4.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("solve-models")
    export(root)
    program = torch.export.export(TwoOutputs(), (torch.ones(3),))
    (root / "twoout").mkdir()
    torch.export.save(program, root / "twoout" / "model.pt2")
    return root


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[TestClient]:
    with make_client(model_dir=repo, job_runner="off") as c:
        yield c


def bratu_body(**options: Any) -> dict[str, Any]:
    return {
        "model": "bratu",
        "primals": {"u": wire(np.zeros((N, N))), "lam": wire([LAMBDA])},
        "unknowns": ["u"],
        "options": options,
    }


# The Bratu problem.


@pytest.mark.parametrize("krylov", ["gmres", "bicgstab"])
def test_bratu_converges_and_agrees_with_scipy_newton_krylov(
    client: TestClient, krylov: str
) -> None:
    r = client.post("/solve", json=bratu_body(krylov=krylov))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["converged"] is True and "reason" not in body
    assert body["residual_norm"] < 1e-8
    u = array(body["solution"]["u"])
    # The residual recomputed here, independently of the service, in numpy.
    assert np.linalg.norm(residual(u)) < 1e-8
    assert np.linalg.norm(array(body["output"])) == pytest.approx(body["residual_norm"], rel=1e-6)
    ref = newton_krylov(residual, np.zeros((N, N)), f_tol=1e-10)
    np.testing.assert_allclose(u, ref, rtol=0, atol=1e-7)
    assert body["dtype"] == "float64" and body["device"] == "cpu"
    history = body["history"]
    assert len(history) == body["iterations"] >= 2
    assert [h["iteration"] for h in history] == list(range(1, len(history) + 1))
    assert history[-1]["residual_norm"] == body["residual_norm"]
    norms = [h["residual_norm"] for h in history]
    assert all(b < a for a, b in zip(norms, norms[1:], strict=False))  # the line search's
    # Every J·v counted: each step's Krylov products (GMRES's closing residuals included).
    assert body["jvp_count"] == sum(h["krylov_iterations"] for h in history)
    assert body["vjp_count"] == 0


def test_bratu_with_a_fixed_krylov_tol(client: TestClient) -> None:
    r = client.post("/solve", json=bratu_body(krylov_tol=1e-10, line_search=False))
    body = r.json()
    assert body["converged"] and body["residual_norm"] < 1e-8
    assert all(h["step"] == 1.0 for h in body["history"])


def test_not_converging_is_a_200_with_the_history(client: TestClient) -> None:
    r = client.post("/solve", json=bratu_body(max_iterations=2))
    assert r.status_code == 200
    body = r.json()
    assert body["converged"] is False
    assert body["iterations"] == 2 and len(body["history"]) == 2
    assert body["residual_norm"] > 1e-8
    # The answer is the last iterate: its residual is the one reported.
    assert np.linalg.norm(residual(array(body["solution"]["u"]))) == pytest.approx(
        body["residual_norm"], rel=1e-6
    )


def test_too_few_krylov_products_do_not_converge_either(client: TestClient) -> None:
    body = client.post("/solve", json=bratu_body(max_krylov=2, max_iterations=3)).json()
    assert body["converged"] is False
    assert all(h["krylov_iterations"] <= 3 for h in body["history"])


# NaN and infinity.


def test_nan_at_the_initial_guess_stops_with_a_reason(client: TestClient) -> None:
    r = client.post(
        "/solve",
        json={
            "expression": "log(u) - a",
            "primals": {"u": wire([-1.0, 2.0]), "a": wire([0.5, 0.5])},
            "unknowns": ["u"],
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert body["converged"] is False
    assert "NaN or infinite" in body["reason"] and "initial guess" in body["reason"]
    assert body["residual_norm"] == "NaN" and body["iterations"] == 0


def test_infinite_jvp_stops_with_a_reason(client: TestClient) -> None:
    # sqrt's derivative at 0 is infinite: f is finite, J·v is not.
    r = client.post(
        "/solve",
        json={
            "expression": "sqrt(u) - a",
            "primals": {"u": wire([0.0, 1.0]), "a": wire([0.5, 0.5])},
            "unknowns": ["u"],
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["converged"] is False
    assert "J·v is NaN or infinite" in body["reason"]


def test_nan_after_a_full_step_without_line_search(client: TestClient) -> None:
    # Newton on log(u) = -5 from u = 3 overshoots to u < 0 where log is NaN.
    r = client.post(
        "/solve",
        json={
            "expression": "log(u) + 5",
            "primals": {"u": wire([3.0])},
            "unknowns": ["u"],
            "options": {"line_search": False},
        },
    )
    body = r.json()
    assert body["converged"] is False and "NaN or infinite" in body["reason"]
    # With the line search the same solve backtracks out of it and converges.
    r = client.post(
        "/solve",
        json={"expression": "log(u) + 5", "primals": {"u": wire([3.0])}, "unknowns": ["u"]},
    )
    body = r.json()
    assert body["converged"], body
    assert array(body["solution"]["u"])[0] == pytest.approx(math.exp(-5), rel=1e-9)


# Linear solves.

A = np.array(
    [[4.0, 1.0, 0.5, 0.0], [1.0, 3.0, 0.2, 0.1], [0.0, 0.7, 5.0, 1.0], [0.3, 0.0, 1.0, 2.0]]
)


@pytest.mark.parametrize("krylov", ["gmres", "bicgstab"])
def test_linear_agrees_with_numpy_solve_on_the_jacobian(client: TestClient, krylov: str) -> None:
    point = {
        "expression": "tanh(A @ u) + u * v",
        "primals": {
            "A": wire(A),
            "u": wire([0.3, -0.2, 0.5, 0.1]),
            "v": wire([2.0, 1.5, 1.0, 3.0]),
        },
    }
    jac = client.post("/jacobian", json={**point, "wrt": ["u"], "options": {"dtype": "float64"}})
    assert jac.status_code == 200, jac.text
    j = array(jac.json()["jacobian"]["u"])
    rhs = np.array([1.0, -2.0, 0.5, 3.0])
    r = client.post(
        "/solve",
        json={
            **point,
            "unknowns": ["u"],
            "method": "linear",
            "rhs": wire(rhs),
            "options": {"krylov": krylov, "tol": 1e-12},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["converged"] and body["iterations"] == 1
    np.testing.assert_allclose(array(body["solution"]["u"]), np.linalg.solve(j, rhs), atol=1e-10)
    assert body["residual_norm"] <= 1e-12 * np.linalg.norm(rhs)


def test_linear_cg_on_a_symmetric_positive_definite_jacobian(client: TestClient) -> None:
    spd = A @ A.T + np.eye(4)
    rhs = np.array([1.0, 2.0, 3.0, 4.0])
    body = client.post(
        "/solve",
        json={
            "expression": "S @ u",
            "primals": {"S": wire(spd), "u": wire(np.zeros(4))},
            "unknowns": ["u"],
            "method": "linear",
            "rhs": wire(rhs),
            "options": {"krylov": "cg", "tol": 1e-12},
        },
    ).json()
    assert body["converged"]
    np.testing.assert_allclose(array(body["solution"]["u"]), np.linalg.solve(spd, rhs), atol=1e-10)


def test_linear_cg_on_an_indefinite_jacobian_says_why(client: TestClient) -> None:
    body = client.post(
        "/solve",
        json={
            "expression": "-(u * u) - u",
            "primals": {"u": wire([1.0, 2.0])},
            "unknowns": ["u"],
            "method": "linear",
            "rhs": wire([1.0, 1.0]),
            "options": {"krylov": "cg"},
        },
    ).json()
    assert body["converged"] is False and "symmetric positive definite" in body["reason"]


# Least squares.


def test_least_squares_recovers_an_exponential_decay(client: TestClient) -> None:
    t = np.linspace(0.0, 4.0, 25)
    y = 2.5 * np.exp(-1.3 * t) + 0.4  # noiseless data
    r = client.post(
        "/solve",
        json={
            "expression": "a * exp(-k * t) + c - y",
            "primals": {
                "a": wire([1.0]),
                "k": wire([0.5]),
                "c": wire([0.0]),
                "t": wire(t),
                "y": wire(y),
            },
            "unknowns": ["a", "k", "c"],
            "method": "least_squares",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["converged"], body
    solution = {k: array(v)[0] for k, v in body["solution"].items()}
    assert solution["a"] == pytest.approx(2.5, abs=1e-8)
    assert solution["k"] == pytest.approx(1.3, abs=1e-8)
    assert solution["c"] == pytest.approx(0.4, abs=1e-8)
    assert body["vjp_count"] > 0 and body["jvp_count"] > 0
    assert array(body["output"]).shape == (25,)


# Bad requests.


def post(client: TestClient, **body: Any) -> Any:
    base = {
        "expression": "u**3 - a",
        "primals": {"u": wire([1.0, 2.0]), "a": wire([2.0, 3.0])},
        "unknowns": ["u"],
    }
    return client.post("/solve", json={**base, **body})


@pytest.mark.parametrize(
    ("unknowns", "says"),
    [
        (["q"], "Unknown input 'q' in unknowns; the inputs are ['a', 'u']"),
        ([], "'unknowns' is empty"),
        (["u", "u"], "names an input twice"),
    ],
)
def test_bad_unknowns_are_422(client: TestClient, unknowns: list[str], says: str) -> None:
    r = post(client, unknowns=unknowns)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "unknowns"
    assert says in r.json()["error"]["message"]


@pytest.mark.parametrize("method", ["newton_krylov", "linear"])
def test_non_square_system_is_422_with_both_sizes(client: TestClient, method: str) -> None:
    extra = {"rhs": wire([1.0, 1.0])} if method == "linear" else {}
    r = post(client, expression="u**3 - a", unknowns=["u", "a"], method=method, **extra)
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "2 elements" in message and "the unknowns have 4" in message
    assert "least_squares" in message


def test_rhs_errors_are_422(client: TestClient) -> None:
    r = post(client, method="linear")
    assert r.status_code == 422 and r.json()["error"]["param"] == "rhs"
    r = post(client, method="linear", rhs=wire([1.0, 2.0, 3.0]))
    assert r.status_code == 422
    assert "Expected rhs of shape [2]" in r.json()["error"]["message"]
    r = post(client, rhs=wire([1.0, 2.0]))
    assert r.status_code == 422 and "linear' only" in r.json()["error"]["message"]


def test_bad_options_are_422(client: TestClient) -> None:
    for options in (
        {"krylov": "minres"},
        {"max_iterations": 0},
        {"tol": -1},
        {"krylov_tol": "x"},
        {"krylov_tol": 1.0},
        {"krylov_tol": 0},
    ):
        r = post(client, options=options)
        assert r.status_code == 422, options


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/solve", json={"model": "nope", "primals": {}, "unknowns": ["u"]})
    assert r.status_code == 404


# Limits: the cost at the iteration caps, before anything runs.


def test_eval_shape_of_a_solve_is_one_products_estimate_times_the_caps(client: TestClient) -> None:
    shapes = {
        "model": "bratu",
        "unknowns": ["u"],
        "primals": {"u": {"shape": [N, N], "dtype": "float64"}, "lam": {"shape": [1]}},
    }
    one = client.post(
        "/eval_shape",
        json={
            "operation": "jvp",
            "model": "bratu",
            "primals": {"u": {"shape": [N, N], "dtype": "float64"}, "lam": {"shape": [1]}},
            "options": {"dtype": "float64"},
        },
    ).json()
    r = client.post("/eval_shape", json={**shapes, "operation": "solve"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["solution"] == {"u": {"shape": [N, N], "dtype": "float64"}}
    assert body["output"] == {"shape": [N, N], "dtype": "float64"}
    # 50 iterations x (200 products + 4 GMRES restarts + 21 line-search evaluations) + 1
    assert body["cost"]["flops"] == one["cost"]["flops"] * (50 * (200 + 4 + 21) + 1)
    fewer = client.post(
        "/eval_shape", json={**shapes, "operation": "solve", "options": {"max_iterations": 5}}
    ).json()
    assert fewer["cost"]["flops"] == one["cost"]["flops"] * (5 * (200 + 4 + 21) + 1)


def test_over_the_flops_limit_is_413_pointing_to_batch_jobs(repo: Path) -> None:
    with make_client(model_dir=repo, job_runner="off", max_request_flops=10**8) as c:
        r = c.post("/solve", json=bratu_body())
        assert r.status_code == 413
        message = r.json()["error"]["message"]
        assert "JVP_MAX_REQUEST_FLOPS" in message and '"operation": "solve"' in message
        assert "/eval_shape" not in message
        # The same request with lower caps fits, and is computed.
        small = c.post("/solve", json=bratu_body(max_iterations=2, max_krylov=20))
        assert small.status_code == 200
        assert c.post("/eval_shape", json={**bratu_body(), "operation": "solve"}).status_code == 413


def test_over_the_bytes_limit_is_413(repo: Path) -> None:
    with make_client(model_dir=repo, job_runner="off", max_request_bytes=200_000) as c:
        r = c.post("/solve", json=bratu_body())
        assert r.status_code == 413
        assert "JVP_MAX_REQUEST_BYTES" in r.json()["error"]["message"]
        assert "batch job" in r.json()["error"]["message"]


def test_past_the_deadline_at_its_caps_is_504_pointing_to_batch_jobs(repo: Path) -> None:
    with make_client(model_dir=repo, job_runner="off", request_timeout_s=0.5) as c:
        r = c.post("/solve", json=bratu_body(max_iterations=10_000, max_krylov=10_000))
        assert r.status_code == 504
        message = r.json()["error"]["message"]
        assert "iteration caps" in message and '"operation": "solve"' in message


def test_request_elements_limit_is_413(repo: Path) -> None:
    with make_client(model_dir=repo, job_runner="off", max_request_elements=100) as c:
        r = c.post("/solve", json=bratu_body())
        assert r.status_code == 413


def test_solve_in_openapi(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/solve"]["post"]
    assert "422" in operation["responses"] and "413" in operation["responses"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/SolveRequest")


# Edges.


def test_singular_jacobian_stops_with_the_krylov_reason(client: TestClient) -> None:
    # J = 3u² is 0 at u = 0: GMRES finds J v = 0 and says so; no step is taken.
    body = post(client, primals={"u": wire([0.0]), "a": wire([8.0])}).json()
    assert body["converged"] is False and "singular" in body["reason"]
    assert array(body["solution"]["u"]).tolist() == [0.0]
    assert body["history"][-1]["step"] == 0.0


def test_no_root_stops_when_the_line_search_finds_no_decrease(client: TestClient) -> None:
    r = client.post(
        "/solve", json={"expression": "u**2 + 1", "primals": {"u": wire([0.5])}, "unknowns": ["u"]}
    )
    body = r.json()
    assert r.status_code == 200 and body["converged"] is False
    assert "no sufficient decrease" in body["reason"]
    assert body["residual_norm"] >= 1.0  # min |u² + 1| is 1


def test_zero_size_and_scalar_unknowns(client: TestClient) -> None:
    empty = {"shape": [0], "dtype": "float64", "data": []}
    body = post(client, primals={"u": empty, "a": empty}).json()
    assert body["converged"] and body["iterations"] == 0 and body["residual_norm"] == 0.0
    scalar = lambda v: {"shape": [], "dtype": "float64", "data": [v]}  # noqa: E731
    body = post(client, primals={"u": scalar(1.0), "a": scalar(8.0)}).json()
    assert body["converged"] and body["solution"]["u"]["shape"] == []
    assert body["solution"]["u"]["data"][0] == pytest.approx(2.0, rel=1e-12)


def test_least_squares_at_a_stationary_point_stops_at_once(client: TestClient) -> None:
    # J = 3u² = 0 at u = 0: Jᵀf = 0, a stationary point of ||f||²; nothing is computed.
    body = post(client, method="least_squares", primals={"u": wire([0.0]), "a": wire([8.0])}).json()
    assert body["converged"] is True and body["iterations"] == 0 and body["history"] == []
    assert body["residual_norm"] == 8.0 and body["vjp_count"] == 1


def test_float32_solve_to_a_float32_tolerance(client: TestClient) -> None:
    body = post(client, options={"dtype": "float32", "tol": 1e-5}).json()
    assert body["dtype"] == "float32" and body["converged"]
    np.testing.assert_allclose(array(body["solution"]["u"]), np.cbrt([2.0, 3.0]), rtol=1e-6)


def test_several_outputs_are_one_system(client: TestClient) -> None:
    point = {"model": "twoout", "primals": {"u": wire([1.0, 1.0, 1.0])}, "unknowns": ["u"]}
    body = client.post("/solve", json=point).json()
    assert body["converged"], body
    np.testing.assert_allclose(array(body["solution"]["u"]), [0.5, 0.5, 2.0], atol=1e-10)
    assert [o["shape"] for o in body["output"]] == [[2], [1]]
    # linear: J = diag(2, 2, 2 u₂) at u = (1, 1, 1); rhs one tensor per output.
    r = client.post(
        "/solve",
        json={**point, "method": "linear", "rhs": [wire([2.0, 4.0]), wire([6.0])]},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(array(r.json()["solution"]["u"]), [1.0, 2.0, 3.0], atol=1e-12)
    r = client.post("/solve", json={**point, "method": "linear", "rhs": wire([2.0, 4.0])})
    assert r.status_code == 422 and "one tensor per output" in r.json()["error"]["message"]
    r = client.post("/solve", json={**point, "method": "linear", "rhs": [wire([2.0, 4.0])]})
    assert r.status_code == 422 and "Expected 2 rhs tensors" in r.json()["error"]["message"]
