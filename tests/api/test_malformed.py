"""Every malformed shape or datum is a 4xx naming the tensor (issue 15, reproducers 2, 5, 8).

Before, a zero dimension let any other dimension past the element limit (``[0, 2**63]``
overflowed inside numpy or torch: a logged 500), ``[{"a": 1}]`` and ``[true]`` shapes were
500s, ``[null]`` was read as NaN, a boolean beside numbers was read as 0 or 1, and a deeply
nested body was 400 on some routes and 422 on others. Each case here asserts the status,
the error type, a message naming the tensor or limit, and that a correct JVP follows.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_binary_body import SAFETENSORS, hand_made

LIMIT = 16_777_216  # JVP_MAX_TENSOR_ELEMENTS, the default


def assert_error(r: Any, status: int, type_: str, message: str, param: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_, error
    assert message in error["message"], error["message"]
    assert error["param"] == param, error


def assert_still_serving(client: TestClient) -> None:
    """x * sin(x) at x = 0 and pi/2 in the direction 1: jvp = sin(x) + x cos(x) = [0, 1]."""
    r = client.post(
        "/jvp",
        json={
            "expression": "x * sin(x)",
            "primals": {"x": {"shape": [2], "dtype": "float64", "data": [0.0, 1.5707963267948966]}},
            "tangents": {"x": [1.0, 1.0]},
            "options": {"dtype": "float64"},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["jvp"]["data"] == pytest.approx([0.0, 1.0], abs=1e-15)


def dimension_message(shape: list[int], axis: int) -> str:
    return (
        f"has shape {shape}: dimension {axis} of size {shape[axis]} passes the limit of "
        f"{LIMIT} elements (JVP_MAX_TENSOR_ELEMENTS), which bounds every dimension, even "
        "beside a zero"
    )


# --- declared shapes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "form"),
    [
        ([0, 67108864], {"data": []}),
        ([0, 2**62], {"data": []}),
        ([0, 2**63], {"data": []}),
        ([0, 2**62], {"b64": ""}),
        ([0, 2**63 - 1, 2**63 - 1], {"b64": ""}),
        ([LIMIT + 1, 0], {"b64": ""}),
    ],
    ids=str,
)
def test_declared_shape_with_a_zero_and_a_huge_dimension_is_413(
    client: TestClient, shape: list[int], form: dict[str, object]
) -> None:
    x = {"shape": shape, "dtype": "float32", **form}
    for path, body in [
        ("/jvp", {"expression": "sum(x)", "primals": {"x": x}}),
        ("/jacobian", {"expression": "sum(x)", "primals": {"x": x}}),
        ("/jvp", {"expression": "sum(x)", "primals": {"x": 1.0}, "tangents": {"x": x}}),
    ]:
        r = client.post(path, json=body)
        param = "tangents.x" if "tangents" in body else "primals.x"
        axis = next(i for i, s in enumerate(shape) if s > LIMIT)
        assert_error(
            r, 413, "too_large", f"Tensor '{param}' " + dimension_message(shape, axis), param
        )
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("shape", "param"),
    [([0, 2**40], "primals.x"), ([2**32, 2**32, 0], "primals.x"), ([0, 2**63], "tangents.x")],
    ids=str,
)
def test_safetensors_header_shape_with_a_huge_dimension_is_413(
    client: TestClient, shape: list[int], param: str
) -> None:
    name = param.replace(".", "/")
    other = "primals/x" if name == "tangents/x" else "tangents/x"
    body = hand_made({name: ("F32", shape, [0, 0]), other: ("F32", [0], [0, 0])}, b"")
    r = client.post("/jvp", content=body, headers={"content-type": SAFETENSORS})
    axis = next(i for i, s in enumerate(shape) if s > LIMIT)
    assert_error(r, 413, "too_large", f"Tensor '{param}' " + dimension_message(shape, axis), param)
    assert_still_serving(client)


@pytest.mark.parametrize("shape", [[True], [2, False], [-1], [1.5], "2", None], ids=str)
def test_shape_that_is_not_non_negative_integers_is_422(client: TestClient, shape: object) -> None:
    body = hand_made({"primals/x": ("F32", shape, [0, 4])}, bytes(4))  # type: ignore[dict-item]
    r = client.post("/jvp", content=body, headers={"content-type": SAFETENSORS})
    assert_error(
        r,
        422,
        "invalid_request",
        "Expected the shape of tensor 'primals/x' as a list of non-negative integers, got "
        + repr(shape),
        "primals.x.shape",
    )
    x = {"shape": shape, "dtype": "float32", "data": [1.0]}
    r = client.post("/jvp", json={"expression": "x", "primals": {"x": x}})
    assert_error(
        r,
        422,
        "invalid_request",
        "Expected 'primals.x.shape' as a list of non-negative integers, got " + repr(shape),
        "primals.x.shape",
    )
    assert_still_serving(client)


# --- data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"a": 1}], "Tensor 'primals.x' holds the JSON object {'a': 1}; expected numbers"),
        ([1.0, {"a": 1}], "Tensor 'primals.x' holds the JSON object {'a': 1}; expected numbers"),
        ([None], "Tensor 'primals.x' holds null; expected numbers (NaN is the string \"NaN\")"),
        ([[1.0], [None]], "Tensor 'primals.x' holds null"),
        (["NaN", None], "Tensor 'primals.x' holds null"),
        ([True, 2.5], "Tensor 'primals.x' holds a boolean; expected numbers"),
        ([2, False], "Tensor 'primals.x' holds a boolean; expected numbers"),
        ([[0.5, 2.0], [3.0, True]], "Tensor 'primals.x' holds a boolean"),
        ([0.25] * 500 + [True], "Tensor 'primals.x' holds a boolean"),
        ([True], "Tensor 'primals.x' must hold numbers"),
        ([[1.0, 2.0], [3.0]], "Tensor 'primals.x' is not a rectangular nested list of numbers"),
        ([[1.0, [2.0]]], "Tensor 'primals.x' is not a rectangular nested list of numbers"),
    ],
    ids=lambda v: json.dumps(v)[:40],
)
def test_data_that_is_not_numbers_is_422_naming_the_tensor(
    client: TestClient, data: list[Any], message: str
) -> None:
    for x in (data, {"shape": [len(data)], "dtype": "float64", "data": data}):
        r = client.post("/jvp", json={"expression": "x", "primals": {"x": x}})
        assert_error(r, 422, "invalid_request", message, "primals.x")
    assert_still_serving(client)


def test_nan_spelled_as_the_string_still_reads(client: TestClient) -> None:
    r = client.post("/jvp", json={"expression": "x * 2", "primals": {"x": ["NaN", 1.0]}})
    assert r.status_code == 200, r.text
    assert r.json()["output"]["data"] == ["NaN", 2.0]
    # 0 and 1 are numbers (the boolean check looks at types, not values).
    r = client.post("/jvp", json={"expression": "x * 2", "primals": {"x": [0, 1, 0.0, 1.0] * 40}})
    assert r.status_code == 200, r.text
    assert r.json()["output"]["data"] == [0.0, 2.0, 0.0, 2.0] * 40


def test_job_task_with_a_huge_dimension_is_stored_failed_with_413(client: TestClient) -> None:
    x = {"shape": [0, 2**63], "dtype": "float32", "data": []}
    r = client.post("/jobs", json={"expression": "sum(x)", "tasks": [{"primals": {"x": x}}]})
    assert r.status_code == 202, r.text
    results = client.get(f"/jobs/{r.json()['id']}/results").json()["results"]
    assert results[0]["error"]["type"] == "too_large"
    assert dimension_message([0, 2**63], 1) in results[0]["error"]["message"]
    assert_still_serving(client)


# --- deeply nested bodies ---------------------------------------------------------------


def body_routes(client: TestClient) -> list[str]:
    """Every POST route that takes a body (FastAPI's body parameter, or /jvp, which reads
    its own), with sample path parameters: a new route is covered without editing this."""
    from fastapi import routing

    return sorted(
        re.sub(r"\{[^}]+\}", "sample", c.path)
        for c in routing.iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
        if "POST" in (c.methods or ())
        and (c.path == "/jvp" or getattr(c, "body_field", None) is not None)
    )


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"expression": "x", "primals": {"x": ' + "[" * 1030 + "]" * 1030 + "}}",
    ],
    ids=["array", "inside"],
)
def test_deeply_nested_body_is_422_on_every_route(client: TestClient, body: str) -> None:
    routes = body_routes(client)
    assert {"/jvp", "/jobs", "/jacobian", "/hvp", "/linearize", "/linearize/sample/jvp"} <= set(
        routes
    )
    for path in routes:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert_error(
            r, 422, "invalid_request", "The body is not valid JSON: depth limit exceeded", "body"
        )
    assert_still_serving(client)


def test_nesting_just_within_the_parser_limit_is_422_not_500(client: TestClient) -> None:
    deep = "[" * 1000 + "]" * 1000
    for path, body in [
        ("/jvp", '{"expression": "x", "primals": {"x": ' + deep + "}}"),
        ("/jvp", '{"expression": ' + deep + ', "primals": {"x": 1}}'),
        ("/jacobian", '{"expression": ' + deep + ', "primals": {"x": 1}}'),
        ("/jobs", '{"expression": ' + deep + ', "tasks": []}'),
    ]:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["type"] == "invalid_request"
    assert_still_serving(client)
