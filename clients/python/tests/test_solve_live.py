"""client.solve, AsyncJVPClient.solve and `jvp solve` against the real server (in-process
and over uvicorn), every answer checked against numpy computed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_live
import torch

from jvp_client import APIStatusError, AsyncJVPClient, JVPClient, SolveResult
from jvp_client.cli import main as cli_main

asgi = test_live.asgi
live_url = test_live.live_url
client = test_live.client
async_client = test_live.async_client

A = np.array([[3.0, 1.0, 0.0], [0.5, 4.0, 1.0], [0.0, 1.0, 2.0]])
B = np.array([1.0, -2.0, 0.5])
EXPR = "A @ u + u**3 - b"  # f(u) = A u + u³ - b: one root near A⁻¹b


def residual(u: np.ndarray) -> np.ndarray:
    return A @ u + u**3 - B


def test_solve_numpy_in_numpy_out(client: JVPClient) -> None:
    r = client.solve(
        expression=EXPR, primals={"A": A, "b": B, "u": np.zeros(3)}, unknowns="u", tol=1e-12
    )
    assert isinstance(r, SolveResult)
    assert r.converged and r.reason is None and r.residual_norm < 1e-12
    assert isinstance(r.solution["u"], np.ndarray) and r.solution["u"].dtype == np.float64
    assert np.linalg.norm(residual(r.solution["u"])) < 1e-12
    np.testing.assert_allclose(r.output, residual(r.solution["u"]), atol=1e-12)
    assert r.iterations == len(r.history) and r.jvp_count > 0 and r.vjp_count == 0
    assert r.dtype == "float64" and r.request_id


def test_solve_torch_in_torch_out_linear(client: JVPClient) -> None:
    u0 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    primals = {"A": torch.from_numpy(A), "b": torch.from_numpy(B), "u": u0}
    rhs = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    r = client.solve(
        expression=EXPR,
        primals=primals,
        unknowns=["u"],
        method="linear",
        rhs=rhs,
        krylov="bicgstab",
        tol=1e-13,
    )
    assert isinstance(r.solution["u"], torch.Tensor)
    jacobian = A + np.diag(3 * u0.numpy() ** 2)
    np.testing.assert_allclose(r.solution["u"].numpy(), np.linalg.solve(jacobian, rhs), atol=1e-11)


def test_solve_not_converging_and_refusals(client: JVPClient) -> None:
    primals = {"A": A, "b": B, "u": np.zeros(3)}
    r = client.solve(expression=EXPR, primals=primals, unknowns="u", max_iterations=1)
    assert r.converged is False and r.iterations == 1
    with pytest.raises(APIStatusError) as info:
        client.solve(expression=EXPR, primals=primals, unknowns="nope")
    assert info.value.status_code == 422 and "Unknown input 'nope'" in str(info.value)
    with pytest.raises(ValueError, match="unknowns"):
        client.solve(expression=EXPR, primals=primals, unknowns=[])


@pytest.mark.asyncio
async def test_async_solve_least_squares(async_client: AsyncJVPClient) -> None:
    t = np.linspace(0.0, 3.0, 20)
    y = 1.5 * np.exp(-0.7 * t)
    r = await async_client.solve(
        expression="a * exp(-k * t) - y",
        primals={"a": np.array([1.0]), "k": np.array([0.2]), "t": t, "y": y},
        unknowns=["a", "k"],
        method="least_squares",
    )
    assert r.converged and r.vjp_count > 0
    assert abs(r.solution["a"][0] - 1.5) < 1e-8 and abs(r.solution["k"][0] - 0.7) < 1e-8


def test_solve_cli_round_trip(live_url: str, tmp_path: Path, capsys: Any) -> None:
    files = {}
    for name, value in {"A": A, "b": B, "u": np.zeros(3)}.items():
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], value)
    out = tmp_path / "solution.npz"
    argv = ["solve", "--base-url", live_url, "-e", EXPR, "--unknown", "u", "--tol", "1e-12"]
    for name, path in files.items():
        argv += ["--primal", f"{name}={path}"]
    code = cli_main([*argv, "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "converged in" in printed.out and "solution u:" in printed.out
    with np.load(out) as data:
        assert sorted(data.files) == ["output", "solution_u"]
        assert np.linalg.norm(residual(data["solution_u"])) < 1e-12
    # Not converging: exit status 1, and it says so.
    code = cli_main([*argv, "--max-iterations", "1"])
    printed = capsys.readouterr()
    assert code == 1 and "did NOT converge" in printed.out


def test_eval_shape_of_a_solve_before_sending(client: JVPClient) -> None:
    from jvp_client import ShapeInfo

    primals = {"A": ShapeInfo((3, 3), "float64"), "b": ShapeInfo((3,), "float64")}
    primals["u"] = ShapeInfo((3,), "float64")
    one = client.eval_shape(expression=EXPR, primals=primals, tangents={"u": primals["u"]})
    shaped = client.eval_shape(
        "solve", expression=EXPR, primals=primals, unknowns="u", options={"max_iterations": 2}
    )
    assert shaped.result == {"u": ShapeInfo((3,), "float64")}
    assert shaped.output == ShapeInfo((3,), "float64")
    assert shaped.flops == one.flops * (2 * (200 + 4 + 21) + 1)
