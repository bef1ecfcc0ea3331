"""options.check: J·v against central finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from tests.derivatives.refs import post, randn
from tests.wire import from_wire, to_wire


@pytest.mark.parametrize("dtype,bound", [("float64", 1e-8), ("float32", 1e-4)])
def test_create_jvp_check_passes_on_expression(
    client: TestClient, dtype: str, bound: float
) -> None:
    x, y = randn(6, seed=10), randn(6, seed=11) + 3.0
    body = post(
        client,
        "/jvp",
        {
            "expression": "exp(sin(x)) * log(y) + x / y",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "tangents": {"x": to_wire(randn(6, seed=12)), "y": to_wire(randn(6, seed=13))},
            "options": {"dtype": dtype, "check": True},
        },
    )
    check = body["check"]
    assert check["passed"] is True
    assert 0 <= check["max_abs_error"] < bound
    assert 0 <= check["max_rel_error"] < bound
    # The step follows the inputs' scale: cbrt(eps64) * max(1, |x|_inf) for the largest input.
    step = torch.finfo(torch.float64).eps ** (1 / 3) * max(1.0, float(y.abs().max()))
    assert check["eps"] == pytest.approx(step, rel=1e-6)


@pytest.mark.parametrize("name,width", [("linear", 5), ("mlp", 64)])
def test_create_jvp_check_passes_on_models(client: TestClient, name: str, width: int) -> None:
    weight = "weight" if name == "linear" else "2.weight"
    shape = [5, 5] if name == "linear" else [64, 256]
    body = post(
        client,
        "/jvp",
        {
            "model": name,
            "primals": {"x": to_wire(randn(4, width, seed=14))},
            "tangents": {"x": to_wire(randn(4, width, seed=15))},
            "parameter_tangents": {weight: to_wire(randn(*shape, seed=16))},
            "options": {"dtype": "float64", "check": True},
        },
    )
    assert body["check"]["passed"] is True
    assert body["check"]["max_abs_error"] < 1e-8


def test_create_jvp_check_batched_checks_every_direction(client: TestClient) -> None:
    body = post(
        client,
        "/jvp",
        {
            "expression": "tanh(x) * x",
            "primals": {"x": to_wire(randn(5, seed=17))},
            "tangents": {"x": to_wire(randn(4, 5, seed=18))},
            "options": {"dtype": "float64", "check": True, "tangent_batch": True},
        },
    )
    assert from_wire(body["jvp"]).shape == (4, 5)
    assert body["check"]["passed"] is True and body["check"]["max_abs_error"] < 1e-8


def test_create_jvp_check_fails_at_a_kink(client: TestClient) -> None:
    # relu at 0: forward AD says 0 (torch's convention), central differences see 0.5 * v.
    body = post(
        client,
        "/jvp",
        {
            "expression": "relu(x)",
            "primals": {"x": [0.0, 1.0]},
            "tangents": {"x": [2.0, 1.0]},
            "options": {"dtype": "float64", "check": True},
        },
    )
    check = body["check"]
    assert check["passed"] is False
    assert check["max_abs_error"] == pytest.approx(1.0, rel=1e-9)
    assert from_wire(body["jvp"]).tolist() == [0.0, 1.0]


def test_create_jvp_without_check_has_no_check(client: TestClient) -> None:
    body = post(client, "/jvp", {"expression": "x", "primals": {"x": [1.0]}})
    assert "check" not in body


def _check_of(client: TestClient, expression: str, primals: dict, tangents: dict) -> dict:
    body = post(
        client,
        "/jvp",
        {
            "expression": expression,
            "primals": primals,
            "tangents": tangents,
            "options": {"dtype": "float64", "check": True},
        },
    )
    check: dict = body["check"]
    return check


def test_create_jvp_check_fails_on_a_nan_jvp_where_the_estimate_is_finite(
    client: TestClient,
) -> None:
    # sqrt(x**2) = |x| at 0: forward AD gives (2 x t) / (2 sqrt 0) = 0 * inf = NaN, central
    # differences (|h| - |-h|) / 2h = 0. max(0.0, nan) is 0.0 in Python: it must not pass.
    check = _check_of(client, "sqrt(x**2)", {"x": [0.0, 2.0]}, {"x": [1.0, 1.0]})
    assert check["passed"] is False
    assert check["nonfinite"] == "jvp"
    # The errors cover the elements where both are finite: |x|' = 1 at 2.
    assert 0 <= check["max_abs_error"] < 1e-8


def test_create_jvp_check_fails_on_a_nan_estimate_where_the_jvp_is_finite(
    client: TestClient,
) -> None:
    # log at 1e-7: the step (about 6e-6) leaves the domain, log(x - h) is NaN; d log = 1e7.
    check = _check_of(client, "log(x)", {"x": [1e-7]}, {"x": [1.0]})
    assert check["passed"] is False
    assert check["nonfinite"] == "estimate"


def test_create_jvp_check_names_both_when_each_side_fails_somewhere(client: TestClient) -> None:
    primals = {"x": [0.0, 1.0], "y": [1.0, 1e-7]}  # NaN JVP at [0], NaN estimate at [1]
    tangents = {"x": [1.0, 1.0], "y": [1.0, 1.0]}
    check = _check_of(client, "sqrt(x**2) + log(y)", primals, tangents)
    assert (check["passed"], check["nonfinite"]) == (False, "both")


def test_create_jvp_check_that_passes_has_no_nonfinite(client: TestClient) -> None:
    check = _check_of(client, "sin(x) * y", {"x": [0.5, 1.0], "y": [2.0, 3.0]}, {"x": [1.0, 2.0]})
    assert check["passed"] is True and check["nonfinite"] is None
    assert 0 <= check["max_abs_error"] < 1e-8
