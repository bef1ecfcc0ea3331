"""client.vjp, Linearization.vjp and `jvp vjp` against the real server (in-process and over
uvicorn), every number against torch.func.vjp computed here in float64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_live
import torch

from jvp_client import AsyncJVPClient, JVPClient, VJPResult
from jvp_client.cli import main as cli_main

asgi = test_live.asgi
live_url = test_live.live_url
client = test_live.client
async_client = test_live.async_client

F64 = torch.float64
EXPR = "tanh(A @ x) * y"


def f(A: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.tanh(A @ x) * y


def _point(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "A": torch.randn(4, 3, generator=g, dtype=F64),
        "x": torch.randn(3, generator=g, dtype=F64),
        "y": torch.randn(4, generator=g, dtype=F64),
    }


def test_vjp_numpy_in_numpy_out(client: JVPClient) -> None:
    p = _point(1)
    u = np.random.default_rng(2).standard_normal(4)
    result = client.vjp(
        expression=EXPR, primals={k: v.numpy() for k, v in p.items()}, cotangents=u, wrt="x"
    )
    assert isinstance(result, VJPResult) and result.method == "reverse"
    assert list(result.vjp) == ["x"] and isinstance(result.vjp["x"], np.ndarray)
    _, fn = torch.func.vjp(lambda x: f(p["A"], x, p["y"]), p["x"])
    np.testing.assert_allclose(result.vjp["x"], fn(torch.from_numpy(u))[0].numpy(), rtol=1e-12)


def test_vjp_torch_batched_with_check(client: JVPClient) -> None:
    p = _point(3)
    us = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    result = client.vjp(expression=EXPR, primals=p, cotangents=us, cotangent_batch=True, check=True)
    assert isinstance(result.vjp["A"], torch.Tensor) and result.vjp["A"].shape == (5, 4, 3)
    _, fn = torch.func.vjp(f, *p.values())
    for k in range(5):
        for name, ref in zip(("A", "x", "y"), fn(us[k]), strict=True):
            torch.testing.assert_close(result.vjp[name][k], ref, rtol=1e-12, atol=1e-14)
    assert result.check is not None and result.check["passed"] is True


@pytest.mark.asyncio
async def test_async_vjp(async_client: AsyncJVPClient) -> None:
    p = _point(5)
    u = torch.ones(4, dtype=F64)
    result = await async_client.vjp(expression=EXPR, primals=p, cotangents=u)
    _, fn = torch.func.vjp(f, *p.values())
    torch.testing.assert_close(result.vjp["x"], fn(u)[1], rtol=1e-12, atol=1e-14)


def test_vjp_unpacks_carries_request_id_and_answers_b64_for_b64_cotangents(
    client: JVPClient,
) -> None:
    # Primals of 52 elements go as JSON; the cotangent (100 elements) goes base64, so the
    # answer is asked base64 too ("auto"); encoding="json" asks JSON whatever went out.
    x = np.linspace(-1.0, 1.0, 2)
    y = np.linspace(0.5, 2.0, 50).reshape(50, 1)
    u = np.random.default_rng(10).standard_normal((50, 2))
    out, grads = client.vjp(expression="sin(x) * y", primals={"x": x, "y": y}, cotangents=u)
    np.testing.assert_allclose(out, np.sin(x) * y, rtol=1e-12)
    np.testing.assert_allclose(grads["x"], (np.cos(x) * y * u).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(grads["y"], (np.sin(x) * u).sum(axis=1, keepdims=True), rtol=1e-12)
    result = client.vjp(expression="sin(x) * y", primals={"x": x, "y": y}, cotangents=u)
    assert isinstance(result.request_id, str) and result.request_id
    assert "b64" in result.raw["vjp"]["y"]
    as_json = client.vjp(
        expression="sin(x) * y", primals={"x": x, "y": y}, cotangents=u, encoding="json"
    )
    assert "b64" not in as_json.raw["vjp"]["y"]
    np.testing.assert_array_equal(as_json.vjp["y"], result.vjp["y"])


def test_vjp_refuses_bad_arguments_before_sending() -> None:
    # Nothing listens on port 9: every one of these is refused before a request is sent.
    with JVPClient(base_url="http://127.0.0.1:9", max_retries=0) as c:
        with pytest.raises(TypeError, match="exactly one of expression= or model="):
            c.vjp(primals={"x": 1.0}, cotangents=1.0)
        with pytest.raises(TypeError, match="cotangent_batch to be True or False"):
            c.vjp(expression="x", primals={"x": 1.0}, cotangents=1.0, cotangent_batch=1)
        with pytest.raises(TypeError, match=r"vjp\(\): cotangents: expected a numeric"):
            c.vjp(expression="x", primals={"x": 1.0}, cotangents=np.array(["a"]))
        with pytest.raises(ValueError, match="expected wrt to be input or parameter names"):
            c.vjp(expression="x", primals={"x": 1.0}, cotangents=1.0, wrt=[""])


@pytest.mark.asyncio
async def test_async_linearization_vjp_batched(live_url: str) -> None:
    p = _point(11)
    us = torch.randn(3, 4, generator=torch.Generator().manual_seed(12), dtype=F64)
    _, fn = torch.func.vjp(f, *p.values())
    async with AsyncJVPClient(base_url=live_url, max_retries=0) as ac:
        lin = await ac.linearize(expression=EXPR, primals=p, options={"transpose": True})
        async with lin:
            got = await lin.vjp(cotangents=us, cotangent_batch=True)
    for k in range(3):
        for name, ref in zip(("A", "x", "y"), fn(us[k]), strict=True):
            torch.testing.assert_close(got[name][k], ref, rtol=1e-12, atol=1e-14)


def test_linearization_vjp(asgi: JVPClient) -> None:
    p = _point(6)
    _, fn = torch.func.vjp(f, *p.values())
    with asgi.linearize(expression=EXPR, primals=p, options={"transpose": True}) as lin:
        for seed in (7, 8):
            u = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=F64)
            got = lin.vjp(cotangents=u)
            for name, ref in zip(("A", "x", "y"), fn(u), strict=True):
                torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-14)


def _save(tmp_path: Path, **arrays: Any) -> dict[str, str]:
    paths = {}
    for name, value in arrays.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, np.asarray(value))
        paths[name] = str(path)
    return paths


def test_vjp_cli_round_trip(live_url: str, tmp_path: Path, capsys: Any) -> None:
    p = _point(9)
    u = np.arange(4.0)
    files = _save(tmp_path, u=u, **{k: v.numpy() for k, v in p.items()})
    out = tmp_path / "vjp.npz"
    argv = ["vjp", "--base-url", live_url, "--expression", EXPR, "--cotangent", files["u"]]
    for name in ("A", "x", "y"):
        argv += ["--primal", f"{name}={files[name]}"]
    code = cli_main([*argv, "--wrt", "x", "--check", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "vjp x:" in printed.out and "check: passed" in printed.out
    _, fn = torch.func.vjp(lambda x: f(p["A"], x, p["y"]), p["x"])
    with np.load(out) as data:
        assert sorted(data.files) == ["output", "vjp_x"]
        np.testing.assert_allclose(data["vjp_x"], fn(torch.from_numpy(u))[0].numpy(), rtol=1e-12)


def test_eval_shape_of_vjp_before_sending(client: JVPClient) -> None:
    from jvp_client import ShapeInfo

    primals = {"A": ShapeInfo((4, 3), "float64"), "x": ShapeInfo((3,), "float64")}
    primals["y"] = ShapeInfo((4,), "float64")
    shaped = client.eval_shape(
        "vjp",
        expression=EXPR,
        primals=primals,
        cotangents=ShapeInfo((5, 4), "float64"),
        dtype="float64",
        options={"cotangent_batch": True},
    )
    assert shaped.output == ShapeInfo((4,), "float64")
    assert shaped.result == {
        "A": ShapeInfo((5, 4, 3), "float64"),
        "x": ShapeInfo((5, 3), "float64"),
        "y": ShapeInfo((5, 4), "float64"),
    }
    forward = client.eval_shape(
        "jvp", expression=EXPR, primals=primals, tangents=primals, dtype="float64"
    )
    assert shaped.flops > forward.flops > 0
    # The shapes agree with what /vjp then answers.
    p = _point(13)
    us = torch.ones(5, 4, dtype=F64)
    result = client.vjp(expression=EXPR, primals=p, cotangents=us, cotangent_batch=True)
    assert {k: tuple(v.shape) for k, v in result.vjp.items()} == {
        k: s.shape for k, s in shaped.result.items()
    }
