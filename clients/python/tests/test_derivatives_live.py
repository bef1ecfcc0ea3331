"""/jacobian, /hvp, /linearize and the /jvp options tangent_batch and check against the
real server (in-process and over uvicorn, with the fixtures of test_live.py).

Every number is checked in float64 against an independent reference computed
here: ``torch.func.jacrev`` for Jacobians, ``torch.autograd.functional.hvp`` for
Hessian-vector products and ``torch.func.jvp`` per direction for batched and
linearized JVPs.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_live
import torch
from test_live import linear_module, mlp_module

from jvp_client import (
    AsyncJVPClient,
    GradientCheck,
    JVPClient,
    NotFoundError,
    UnprocessableEntityError,
)
from jvp_client.cli import main as cli_main

# test_live.py's fixtures: the app in-process ("asgi") and over uvicorn ("live_url"),
# and the clients on both.
asgi = test_live.asgi
live_url = test_live.live_url
client = test_live.client
async_client = test_live.async_client

F64 = torch.float64


def _point(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "A": torch.randn(4, 3, generator=g, dtype=F64),
        "x": torch.randn(3, generator=g, dtype=F64),
        "y": torch.randn(4, generator=g, dtype=F64),
    }


EXPR = "tanh(A @ x) * y"


def f_expr(A: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.tanh(A @ x) * y


def f_scalar(A: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sum(torch.tanh(A @ x) * y)


def _np(p: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in p.items()}


def _linear64() -> torch.nn.Module:
    return linear_module().double()


def _module_fn(module: torch.nn.Module, name: str) -> Callable[..., torch.Tensor]:
    """The module as a function of (input, parameter ``name``), other parameters fixed."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def f(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, {**params, name: p}, (x,))

    return f


# -- /jacobian ------------------------------------------------------------------------------


def test_jacobian_expression_matches_jacrev(client: JVPClient) -> None:
    p = _point()
    result = client.jacobian(expression=EXPR, primals=_np(p))
    assert result.dtype == "float64" and isinstance(result.jacobian, dict)
    assert list(result.jacobian) == ["A", "x", "y"]
    references = torch.func.jacrev(f_expr, argnums=(0, 1, 2))(p["A"], p["x"], p["y"])
    for name, reference in zip(("A", "x", "y"), references, strict=True):
        got = result.jacobian[name]
        assert got.shape == (4, *p[name].shape)
        np.testing.assert_allclose(got, reference.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.output, f_expr(**p).numpy(), rtol=1e-12)


def test_jacobian_wrt_subset_torch_b64(client: JVPClient) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, generator=g, dtype=F64)  # 80 elements: base64 both ways
    y = torch.randn(80, generator=g, dtype=F64)
    result = client.jacobian(expression="sin(x) * y + x**2", primals={"x": x, "y": y}, wrt="x")
    assert isinstance(result.jacobian, dict) and list(result.jacobian) == ["x"]
    got = result.jacobian["x"]
    assert isinstance(got, torch.Tensor) and got.dtype == F64 and got.shape == (80, 80)
    reference = torch.func.jacrev(lambda x: torch.sin(x) * y + x**2)(x)
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-14)


def test_jacobian_model_wrt_input_and_parameter(client: JVPClient) -> None:
    module = _linear64()
    x = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    result = client.jacobian(model="linear", primals={"x": x}, wrt=["x", "bias"])
    assert isinstance(result.jacobian, dict)
    f = _module_fn(module, "bias")
    ref_x, ref_b = torch.func.jacrev(f, argnums=(0, 1))(x, module.bias.detach())
    assert result.jacobian["x"].shape == (2, 5, 2, 5) and result.jacobian["bias"].shape == (2, 5, 5)
    torch.testing.assert_close(result.jacobian["x"], ref_x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result.jacobian["bias"], ref_b, rtol=1e-12, atol=0.0)


def test_raise_unprocessable_for_unknown_wrt(client: JVPClient) -> None:
    with pytest.raises(UnprocessableEntityError) as info:
        client.jacobian(expression="x * 2", primals={"x": [1.0, 2.0]}, wrt=["z"])
    assert info.value.status_code == 422 and "'z'" in info.value.message


# -- /hvp -----------------------------------------------------------------------------------


def test_hvp_expression_matches_autograd_hvp(client: JVPClient) -> None:
    p = _point(2)
    g = torch.Generator().manual_seed(5)
    vx, vy = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    result = client.hvp(
        expression="sum(tanh(A @ x) * y)", primals=_np(p), tangents={"x": vx, "y": vy}
    )
    assert sorted(result.hvp) == ["x", "y"]  # only inputs with a tangent
    value, (_, hx, hy) = torch.autograd.functional.hvp(
        f_scalar, (p["A"], p["x"], p["y"]), (torch.zeros(4, 3, dtype=F64), vx, vy)
    )
    torch.testing.assert_close(result.hvp["x"], hx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.hvp["y"], hy, rtol=1e-12, atol=1e-14)
    assert float(result.output) == pytest.approx(float(value), rel=1e-12)


def test_hvp_tangent_batch_with_sum_reduction(client: JVPClient) -> None:
    p = _point(6)
    V = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    result = client.hvp(
        expression=EXPR,
        primals=_np(p),
        tangents={"x": V.numpy()},
        reduction="sum",
        tangent_batch=True,
    )
    got = result.hvp["x"]
    assert got.shape == (5, 3)

    def fx(x: torch.Tensor) -> torch.Tensor:
        return f_scalar(p["A"], x, p["y"])

    for k in range(5):
        _, reference = torch.autograd.functional.hvp(fx, p["x"], V[k])
        np.testing.assert_allclose(got[k], reference.numpy(), rtol=1e-12, atol=1e-14)


def test_hvp_model_mean_reduction_matches_autograd_hvp(client: JVPClient) -> None:
    module = mlp_module().double()
    g = torch.Generator().manual_seed(8)
    x, v = torch.randn(2, 64, generator=g, dtype=F64), torch.randn(2, 64, generator=g, dtype=F64)
    result = client.hvp(model="mlp", primals={"x": x}, tangents={"x": v}, reduction="mean")
    value, reference = torch.autograd.functional.hvp(lambda x: module(x).mean(), x, v)
    assert isinstance(result.hvp["x"], torch.Tensor)
    torch.testing.assert_close(result.hvp["x"], reference, rtol=1e-6, atol=1e-10)
    assert float(result.output) == pytest.approx(float(value), rel=1e-6)


# -- /jvp options ---------------------------------------------------------------------------


def test_jvp_tangent_batch_matches_jvp_per_direction(client: JVPClient) -> None:
    p = _point(9)
    V = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    result = client.jvp(expression=EXPR, primals=p, tangents={"x": V}, tangent_batch=True)
    assert isinstance(result.jvp, torch.Tensor) and result.jvp.shape == (6, 4)
    for k in range(6):
        _, reference = torch.func.jvp(lambda x: f_expr(p["A"], x, p["y"]), (p["x"],), (V[k],))
        torch.testing.assert_close(result.jvp[k], reference, rtol=1e-12, atol=1e-14)


def test_jvp_check_passes_for_smooth_function(client: JVPClient) -> None:
    p = _point(11)
    result = client.jvp(
        expression=EXPR,
        primals=_np(p),
        tangents={"x": np.ones(3), "A": np.ones((4, 3))},
        check=True,
    )
    check = result.check
    assert isinstance(check, GradientCheck) and check.passed is True
    assert check.rtol is not None and check.atol is not None and check.eps > 0
    scale = float(np.max(np.abs(result.jvp)))
    assert check.max_abs_error <= check.atol + check.rtol * scale
    assert check.summary().startswith("check passed")


def test_jvp_check_fails_for_relu_at_zero(client: JVPClient) -> None:
    result = client.jvp(
        expression="relu(x)",
        primals={"x": np.array([-1.0, 0.0, 2.0])},
        tangents={"x": np.ones(3)},
        check=True,
    )
    assert result.check is not None and result.check.passed is False
    # forward AD takes relu'(0) = 0; the central difference (eps - 0) / (2 eps) = 1/2
    np.testing.assert_array_equal(result.jvp, [0.0, 0.0, 1.0])
    assert result.check.max_abs_error == pytest.approx(0.5, rel=1e-9)


# -- /linearize -----------------------------------------------------------------------------


def test_linearize_apply_then_close_gives_not_found(client: JVPClient) -> None:
    p = _point(12)
    lin = client.linearize(expression=EXPR, primals=_np(p), wrt=["x", "y"])
    assert lin.wrt == ["x", "y"] and lin.dtype == "float64" and len(lin.id) >= 8
    expires = datetime.datetime.fromisoformat(lin.expires_at.replace("Z", "+00:00"))
    assert expires > datetime.datetime.now(datetime.timezone.utc)
    np.testing.assert_allclose(lin.output, f_expr(**p).numpy(), rtol=1e-12)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f_expr(p["A"], x, y)

    g = torch.Generator().manual_seed(13)
    for _ in range(3):
        vx, vy = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
        got = lin.jvp(tangents={"x": vx.numpy(), "y": vy.numpy()})
        _, reference = torch.func.jvp(f, (p["x"], p["y"]), (vx, vy))
        np.testing.assert_allclose(got, reference.numpy(), rtol=1e-12, atol=1e-14)
    # Python lists take the session's dtype; only x varies
    _, reference = torch.func.jvp(
        lambda x: f(x, p["y"]), (p["x"],), (torch.tensor([1.0, 0.0, -1.0], dtype=F64),)
    )
    got = lin.jvp(tangents={"x": [1.0, 0.0, -1.0]})
    np.testing.assert_allclose(got, reference.numpy(), rtol=1e-12, atol=1e-14)
    V = torch.randn(4, 3, generator=g, dtype=F64)
    batched = lin.jvp(tangents={"x": V}, tangent_batch=True)
    assert isinstance(batched, torch.Tensor) and batched.shape == (4, 4)
    for k in range(4):
        _, reference = torch.func.jvp(lambda x: f(x, p["y"]), (p["x"],), (V[k],))
        torch.testing.assert_close(batched[k], reference, rtol=1e-12, atol=1e-14)
    with pytest.raises(UnprocessableEntityError, match="Unknown name 'A' in tangents"):
        lin.jvp(tangents={"A": np.ones((4, 3))})

    lin.close()
    assert lin.closed
    with pytest.raises(NotFoundError) as info:
        lin.jvp(tangents={"x": vx})
    assert info.value.status_code == 404 and info.value.type == "not_found"
    assert lin.id in info.value.message
    lin.close()  # closing twice is fine


def test_linearize_model_parameters_as_context_manager(client: JVPClient) -> None:
    module = _linear64()
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 5, generator=g, dtype=F64)
    with client.linearize(model="linear", primals={"x": x}, wrt=["x", "weight"]) as lin:
        assert lin.wrt == ["x", "weight"]
        torch.testing.assert_close(lin.output, module(x), rtol=1e-12, atol=1e-14)
        dx, dw = (
            torch.randn(3, 5, generator=g, dtype=F64),
            torch.randn(5, 5, generator=g, dtype=F64),
        )
        got = lin.jvp(tangents={"x": dx}, parameter_tangents={"weight": dw})
        _, reference = torch.func.jvp(
            _module_fn(module, "weight"), (x, module.weight.detach()), (dx, dw)
        )
        torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-14)
        session_id = lin.id
    assert lin.closed
    with pytest.raises(NotFoundError, match=session_id):
        lin.jvp(parameter_tangents={"weight": dw})


@pytest.mark.asyncio
async def test_derivatives_async_match_references(async_client: AsyncJVPClient) -> None:
    p = _point(15)
    jac = await async_client.jacobian(expression=EXPR, primals=p, wrt=["A"])
    assert isinstance(jac.jacobian, dict)
    reference = torch.func.jacrev(f_expr)(p["A"], p["x"], p["y"])
    torch.testing.assert_close(jac.jacobian["A"], reference, rtol=1e-12, atol=1e-14)

    v = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(16))
    hvp = await async_client.hvp(expression="sum(tanh(A @ x) * y)", primals=p, tangents={"x": v})
    _, ref_h = torch.autograd.functional.hvp(lambda x: f_scalar(p["A"], x, p["y"]), p["x"], v)
    torch.testing.assert_close(hvp.hvp["x"], ref_h, rtol=1e-12, atol=1e-14)

    async with await async_client.linearize(expression=EXPR, primals=p) as lin:
        got = await lin.jvp(tangents={"x": v})
        _, ref_j = torch.func.jvp(lambda x: f_expr(p["A"], x, p["y"]), (p["x"],), (v,))
        torch.testing.assert_close(got, ref_j, rtol=1e-12, atol=1e-14)
    assert lin.closed
    with pytest.raises(NotFoundError):
        await lin.jvp(tangents={"x": v})


# -- CLI ------------------------------------------------------------------------------------


def _save(tmp_path: Path, **arrays: Any) -> dict[str, str]:
    paths = {}
    for name, value in arrays.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, np.asarray(value))
        paths[name] = str(path)
    return paths


def test_jacobian_cli_round_trip(live_url: str, tmp_path: Path, capsys) -> None:
    p = _point(17)
    files = _save(tmp_path, **_np(p))
    out = tmp_path / "jac.npz"
    argv = ["jacobian", "--base-url", live_url, "--expression", EXPR]
    for name in ("A", "x", "y"):
        argv += ["--primal", f"{name}={files[name]}"]
    code = cli_main([*argv, "--wrt", "A", "--wrt", "x", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "d output / d A" in printed.out and "dtype float64" in printed.out
    ref_A, ref_x = torch.func.jacrev(f_expr, argnums=(0, 1))(p["A"], p["x"], p["y"])
    with np.load(out) as data:
        assert sorted(data.files) == ["jacobian_A", "jacobian_x", "output"]
        np.testing.assert_allclose(data["jacobian_A"], ref_A.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(data["jacobian_x"], ref_x.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(data["output"], f_expr(**p).numpy(), rtol=1e-12)


def test_hvp_cli_round_trip_tangent_batch(live_url: str, tmp_path: Path, capsys) -> None:
    p = _point(18)
    V = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(19))
    files = _save(tmp_path, **_np(p), V=V.numpy())
    out = tmp_path / "hvp.npz"
    argv = ["hvp", "--base-url", live_url, "-e", EXPR, "--reduction", "sum", "--tangent-batch"]
    for name in ("A", "x", "y"):
        argv += ["-p", f"{name}={files[name]}"]
    code = cli_main([*argv, "-t", f"x={files['V']}", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    with np.load(out) as data:
        assert sorted(data.files) == ["hvp_x", "output"]
        for k in range(3):
            _, reference = torch.autograd.functional.hvp(
                lambda x: f_scalar(p["A"], x, p["y"]), p["x"], V[k]
            )
            np.testing.assert_allclose(data["hvp_x"][k], reference.numpy(), rtol=1e-12)
        assert float(data["output"]) == pytest.approx(float(f_scalar(**p)), rel=1e-12)


def test_call_cli_check_and_tangent_batch(live_url: str, tmp_path: Path, capsys) -> None:
    x = np.array([0.3, -1.2, 2.0])
    V = np.stack([np.ones(3), np.array([1.0, 0.0, -1.0])])
    files = _save(tmp_path, x=x, V=V)
    out = tmp_path / "jvp.npz"
    argv = ["call", "--base-url", live_url, "-e", "sin(x) * x", "-p", f"x={files['x']}"]
    argv += ["-t", f"x={files['V']}", "--tangent-batch", "--check", "--out", str(out)]
    code = cli_main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "check passed: max abs error" in printed.out
    with np.load(out) as data:
        assert data["jvp"].shape == (2, 3)
        np.testing.assert_allclose(data["jvp"], (np.cos(x) * x + np.sin(x)) * V, rtol=1e-12)

    argv = ["call", "--base-url", live_url, "-e", "relu(x)", "-p", "x=[0.0, 1.0]"]
    code = cli_main([*argv, "-t", "x=[1.0, 1.0]", "--check", "--dtype", "float64"])
    printed = capsys.readouterr()
    assert code == 1
    assert "check FAILED: max abs error 0.5" in printed.out
