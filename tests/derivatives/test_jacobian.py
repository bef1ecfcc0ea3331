"""POST /jacobian against torch.func.jacrev and jacfwd of independent references."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import jacfwd, jacrev

from tests.conftest import make_client
from tests.derivatives.refs import model_function, post, randn, served_weights
from tests.wire import from_wire, to_wire


def test_create_jacobian_expression_matches_jacrev(client: TestClient) -> None:
    x, y = randn(3, seed=20), randn(2, 3, seed=21)
    body = post(
        client,
        "/jacobian",
        {
            "expression": "sin(x) * y + sum(y * y, 0)",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "options": {"dtype": "float64"},
        },
    )

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sin(a) * b + (b * b).sum(0)

    jx, jy = jacrev(f, argnums=(0, 1))(x, y)
    assert list(body["jacobian"]) == ["x", "y"]
    got_x, got_y = from_wire(body["jacobian"]["x"]), from_wire(body["jacobian"]["y"])
    assert got_x.shape == (2, 3, 3) and got_y.shape == (2, 3, 2, 3)
    torch.testing.assert_close(got_x, jx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_y, jy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(body["output"]), f(x, y), rtol=0, atol=0)
    assert body["dtype"] == "float64" and body["device"] == "cpu"


def test_create_jacobian_wrt_one_input(client: TestClient) -> None:
    x, y = randn(4, seed=22), randn(4, seed=23)
    body = post(
        client,
        "/jacobian",
        {
            "expression": "x * exp(y)",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "wrt": ["y"],
            "options": {"dtype": "float64"},
        },
    )
    assert list(body["jacobian"]) == ["y"]
    torch.testing.assert_close(
        from_wire(body["jacobian"]["y"]), torch.diag(x * torch.exp(y)), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name,width,parameter", [("linear", 5, "bias"), ("mlp", 64, "2.bias")])
def test_create_jacobian_model_inputs_and_parameters(
    client: TestClient, name: str, width: int, parameter: str
) -> None:
    x = randn(2, width, seed=24)
    body = post(
        client,
        "/jacobian",
        {
            "model": name,
            "primals": {"x": to_wire(x, "b64")},
            "wrt": ["x", parameter],
            "options": {"dtype": "float64", "encoding": "b64"},
        },
    )
    f = model_function(name, (parameter,))
    b = served_weights(name)[parameter]
    jx, jb = jacrev(f, argnums=(0, 1))(x, b)
    fx, fb = jacfwd(f, argnums=(0, 1))(x, b)
    torch.testing.assert_close(from_wire(body["jacobian"]["x"]), jx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_wire(body["jacobian"][parameter]), jb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jx, fx, rtol=1e-12, atol=1e-12)  # the two references agree
    torch.testing.assert_close(jb, fb, rtol=1e-12, atol=1e-12)


def test_create_jacobian_unknown_wrt_is_422(client: TestClient) -> None:
    r = client.post(
        "/jacobian", json={"model": "linear", "primals": {"x": [[0.0] * 5]}, "wrt": ["z"]}
    )
    assert r.status_code == 422
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": "Unknown name 'z' in 'wrt'; the inputs are ['x'] and the parameters are "
        "['weight', 'bias']",
        "param": "wrt",
    }


def test_create_jacobian_tangents_are_rejected(client: TestClient) -> None:
    r = client.post(
        "/jacobian", json={"expression": "x", "primals": {"x": [1.0]}, "tangents": {"x": [1.0]}}
    )
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "Unknown field 'tangents'"


def test_create_jacobian_over_the_limit_is_413() -> None:
    with make_client(max_jacobian_elements=10) as c:
        r = c.post(
            "/jacobian", json={"expression": "x * y", "primals": {"x": [1.0] * 8, "y": [2.0] * 8}}
        )
        assert r.status_code == 413
        error = r.json()["error"]
        assert error["type"] == "too_large" and error["param"] == "wrt"
        assert "16 elements (x: 8, y: 8)" in error["message"]
        assert "the limit is 10 (JVP_MAX_JACOBIAN_ELEMENTS)" in error["message"]
        # Narrowing wrt brings it under the limit.
        r = c.post(
            "/jacobian",
            json={"expression": "x * y", "primals": {"x": [1.0] * 8, "y": [2.0] * 8}, "wrt": ["x"]},
        )
        assert r.status_code == 200, r.text
        torch.testing.assert_close(
            from_wire(r.json()["jacobian"]["x"]), 2.0 * torch.eye(8), rtol=0, atol=0
        )
