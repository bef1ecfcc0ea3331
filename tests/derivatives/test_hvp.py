"""POST /hvp against torch.autograd.functional.hvp (reverse-over-reverse, independent)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from torch.autograd.functional import hvp

from tests.derivatives.refs import model_function, post, randn, served_weights
from tests.wire import from_wire, to_wire


def test_create_hvp_expression_matches_autograd(client: TestClient) -> None:
    x, y = randn(5, seed=30), randn(5, seed=31)
    vx, vy = randn(5, seed=32), randn(5, seed=33)
    body = post(
        client,
        "/hvp",
        {
            "expression": "sum(sin(x) * y**2 + exp(x * y))",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "tangents": {"x": to_wire(vx), "y": to_wire(vy)},
            "options": {"dtype": "float64"},
        },
    )

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.sin(a) * b**2 + torch.exp(a * b)).sum()

    value, (hx, hy) = hvp(f, (x, y), (vx, vy))
    assert list(body["hvp"]) == ["x", "y"]
    torch.testing.assert_close(from_wire(body["hvp"]["x"]), hx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(body["hvp"]["y"]), hy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(body["output"]), value, rtol=1e-14, atol=1e-14)


def test_create_hvp_only_inputs_with_a_tangent_vary(client: TestClient) -> None:
    x, y = randn(4, seed=34), randn(4, seed=35)
    v = randn(4, seed=36)
    body = post(
        client,
        "/hvp",
        {
            "expression": "sum(x**3 * y)",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "tangents": {"x": to_wire(v)},
            "options": {"dtype": "float64"},
        },
    )
    assert list(body["hvp"]) == ["x"]
    torch.testing.assert_close(from_wire(body["hvp"]["x"]), 6 * x * y * v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name,width", [("linear", 5), ("mlp", 64)])
def test_create_hvp_model_with_reduction(
    client: TestClient, name: str, width: int, reduction: str
) -> None:
    x, v = randn(3, width, seed=37), randn(3, width, seed=38)
    body = post(
        client,
        "/hvp",
        {
            "model": name,
            "primals": {"x": to_wire(x)},
            "tangents": {"x": to_wire(v)},
            "reduction": reduction,
            "options": {"dtype": "float64"},
        },
    )
    f = model_function(name)

    def served(a: torch.Tensor) -> torch.Tensor:
        return f(a).sum() if reduction == "sum" else f(a).mean()

    _, ref = hvp(served, x, v)
    torch.testing.assert_close(from_wire(body["hvp"]["x"]), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(from_wire(body["output"]), served(x), rtol=1e-12, atol=1e-12)


def test_create_hvp_model_parameter_tangent(client: TestClient) -> None:
    x = randn(3, 64, seed=39)
    w = served_weights("mlp")["0.weight"]
    v = randn(*w.shape, seed=40)
    body = post(
        client,
        "/hvp",
        {
            "model": "mlp",
            "primals": {"x": to_wire(x, "b64")},
            "parameter_tangents": {"0.weight": to_wire(v, "b64")},
            "reduction": "sum",
            "options": {"dtype": "float64", "encoding": "b64"},
        },
    )
    f = model_function("mlp", ("0.weight",))
    _, ref = hvp(lambda weight: f(x, weight).sum(), w, v)
    assert ref.abs().max() > 1e-3  # a real curvature, not a trivially zero block
    torch.testing.assert_close(from_wire(body["hvp"]["0.weight"]), ref, rtol=1e-10, atol=1e-12)


def test_create_hvp_tangent_batch_equals_single_calls(client: TestClient) -> None:
    x = randn(4, seed=41)
    vs = randn(3, 4, seed=42)
    request = {"expression": "sum(exp(x) * sin(x))", "primals": {"x": to_wire(x)}}
    batched = post(
        client,
        "/hvp",
        {
            **request,
            "tangents": {"x": to_wire(vs)},
            "options": {"dtype": "float64", "tangent_batch": True},
        },
    )
    got = from_wire(batched["hvp"]["x"])
    assert got.shape == (3, 4)
    for k in range(3):
        single = post(
            client,
            "/hvp",
            {**request, "tangents": {"x": to_wire(vs[k])}, "options": {"dtype": "float64"}},
        )
        torch.testing.assert_close(got[k], from_wire(single["hvp"]["x"]), rtol=1e-12, atol=1e-12)


def test_create_hvp_non_scalar_without_reduction_is_422(client: TestClient) -> None:
    r = client.post(
        "/hvp",
        json={"model": "linear", "primals": {"x": [[1.0] * 5]}, "tangents": {"x": [[1.0] * 5]}},
    )
    assert r.status_code == 422
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": "/hvp needs a scalar-valued function, but output 0 has shape [1, 5]; set "
        "'reduction' to 'sum' or 'mean' to reduce it",
        "param": "reduction",
    }


def test_create_hvp_output_index_out_of_range_is_422(client: TestClient) -> None:
    r = client.post(
        "/hvp",
        json={
            "model": "linear",
            "primals": {"x": [[1.0] * 5]},
            "tangents": {"x": [[1.0] * 5]},
            "output_index": 2,
            "reduction": "sum",
        },
    )
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "output_index 2 is out of range: the function has 1 output(s)"
    )


def test_create_hvp_without_tangents_is_422(client: TestClient) -> None:
    r = client.post("/hvp", json={"expression": "sum(x**2)", "primals": {"x": [1.0, 2.0]}})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "tangents"
    assert "needs at least one tangent" in r.json()["error"]["message"]
