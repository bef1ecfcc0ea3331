"""options.tangent_batch: J·V for K directions in one call equals K single /jvp calls and
torch.func.jvp, to 1e-12 in float64."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import jvp

from tests.derivatives.refs import model_function, post, randn, served_weights
from tests.wire import from_wire, to_wire


@pytest.mark.parametrize("k", [1, 3, 8])
def test_create_jvp_tangent_batch_expression_equals_single_calls(
    client: TestClient, k: int
) -> None:
    x, y = randn(4, 3, seed=0), randn(4, 3, seed=1)
    vx, vy = randn(k, 4, 3, seed=2), randn(k, 4, 3, seed=3)
    expression = "sin(x) * y + x**2 / (1 + y**2)"
    primals = {"x": to_wire(x), "y": to_wire(y)}
    body = post(
        client,
        "/jvp",
        {
            "expression": expression,
            "primals": primals,
            "tangents": {"x": to_wire(vx), "y": to_wire(vy)},
            "options": {"dtype": "float64", "tangent_batch": True},
        },
    )
    batched = from_wire(body["jvp"])
    assert batched.shape == (k, 4, 3)
    assert body["engine"] == "functional"

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sin(a) * b + a**2 / (1 + b**2)

    for i in range(k):
        single = post(
            client,
            "/jvp",
            {
                "expression": expression,
                "primals": primals,
                "tangents": {"x": to_wire(vx[i]), "y": to_wire(vy[i])},
                "options": {"dtype": "float64"},
            },
        )
        torch.testing.assert_close(batched[i], from_wire(single["jvp"]), rtol=1e-12, atol=1e-12)
        _, ref = jvp(f, (x, y), (vx[i], vy[i]))
        torch.testing.assert_close(batched[i], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(body["output"]), f(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("name,width", [("linear", 5), ("mlp", 64)])
def test_create_jvp_tangent_batch_model_with_parameter_tangents(
    client: TestClient, name: str, width: int
) -> None:
    k = 4
    weight = "weight" if name == "linear" else "0.weight"
    shape = tuple(served_weights(name)[weight].shape)
    x = randn(3, width, seed=4)
    v = randn(k, 3, width, seed=5)
    w = randn(k, *shape, seed=6)
    body = post(
        client,
        "/jvp",
        {
            "model": name,
            "primals": {"x": to_wire(x, "b64")},
            "tangents": {"x": to_wire(v, "b64")},
            "parameter_tangents": {weight: to_wire(w, "b64")},
            "options": {"dtype": "float64", "tangent_batch": True, "encoding": "b64"},
        },
    )
    batched = from_wire(body["jvp"])
    f = model_function(name, (weight,))
    for i in range(k):
        _, ref = jvp(f, (x, served_weights(name)[weight]), (v[i], w[i]))
        torch.testing.assert_close(batched[i], ref, rtol=1e-12, atol=1e-12)


def test_create_jvp_tangent_batch_missing_tangent_is_zero_for_all_k(client: TestClient) -> None:
    x, y = randn(5, seed=7), randn(5, seed=8)
    vy = randn(6, 5, seed=9)
    body = post(
        client,
        "/jvp",
        {
            "expression": "x * exp(y)",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "tangents": {"y": to_wire(vy)},
            "options": {"dtype": "float64", "tangent_batch": True},
        },
    )
    torch.testing.assert_close(
        from_wire(body["jvp"]), x * torch.exp(y) * vy, rtol=1e-12, atol=1e-12
    )


def test_create_jvp_tangent_batch_different_k_is_422_with_shapes(client: TestClient) -> None:
    r = client.post(
        "/jvp",
        json={
            "expression": "x * y",
            "primals": {"x": [1.0, 2.0], "y": [3.0, 4.0]},
            "tangents": {"x": [[1.0, 0.0]] * 3, "y": [[0.0, 1.0]] * 2},
            "options": {"tangent_batch": True},
        },
    )
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "invalid_request"
    assert "same leading K" in error["message"]
    assert "tangent 'x' [3, 2]" in error["message"] and "tangent 'y' [2, 2]" in error["message"]


def test_create_jvp_tangent_batch_unbatched_tangent_is_422(client: TestClient) -> None:
    r = client.post(
        "/jvp",
        json={
            "expression": "x * 2",
            "primals": {"x": [[1.0, 2.0], [3.0, 4.0]]},
            "tangents": {"x": [1.0, 1.0]},
            "options": {"tangent_batch": True},
        },
    )
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "Expected tangent 'x' of shape [K, 2, 2] with options.tangent_batch (K directions), got [2]"
    )
    assert r.json()["error"]["param"] == "tangents.x"


def test_create_jvp_tangent_batch_without_tangents_is_422(client: TestClient) -> None:
    r = client.post(
        "/jvp",
        json={"expression": "x * 2", "primals": {"x": [1.0]}, "options": {"tangent_batch": True}},
    )
    assert r.status_code == 422
    assert "needs at least one tangent" in r.json()["error"]["message"]
