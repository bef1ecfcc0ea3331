"""Bad input: each a 4xx in the error envelope with a useful message; the server keeps answering."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

X = {"x": [[1.0, 2.0], [3.0, 4.0]]}

CASES = [
    # (id, body, status, type, piece of the message)
    ("syntax", {"expression": "x +* y", "primals": X}, 400, "invalid_expression", "yntax"),
    ("unknown_function", {"expression": "foo(x)", "primals": X}, 400, "invalid_expression", "foo"),
    (
        "builtin_name",
        {"expression": "__import__('os')", "primals": X},
        400,
        "invalid_expression",
        "",
    ),
    (
        "attribute",
        {"expression": "x.__class__", "primals": X},
        400,
        "invalid_expression",
        "ttribute",
    ),
    ("subscript", {"expression": "x[0]", "primals": X}, 400, "invalid_expression", "Indexing"),
    ("lambda", {"expression": "(lambda: 1)()", "primals": {}}, 400, "invalid_expression", ""),
    (
        "comprehension",
        {"expression": "[i for i in x]", "primals": X},
        400,
        "invalid_expression",
        "",
    ),
    ("string", {"expression": "'abc'", "primals": {}}, 400, "invalid_expression", "tring"),
    ("keyword", {"expression": "sum(x, dim=0)", "primals": X}, 400, "invalid_expression", "dim"),
    (
        "keyword_trick",
        {"expression": "sum(x, **{'dim': 0})", "primals": X},
        400,
        "invalid_expression",
        "",
    ),
    (
        "escape",
        {"expression": "().__class__.__bases__[0].__subclasses__()", "primals": {}},
        400,
        "invalid_expression",
        "",
    ),
    ("too_long", {"expression": "x+" * 2000 + "x", "primals": X}, 413, "too_large", "2000"),
    (
        "too_deep",
        {"expression": "(" * 200 + "x" + ")" * 200, "primals": X},
        413,
        "too_large",
        "limit",
    ),
    ("neither", {"primals": X}, 422, "invalid_request", "exactly one of 'expression' or 'model'"),
    (
        "both",
        {"expression": "x", "model": "linear", "primals": X},
        422,
        "invalid_request",
        "exactly one",
    ),
    ("unknown_model", {"model": "nope", "primals": X}, 404, "not_found", "Unknown model 'nope'"),
    ("missing_input", {"expression": "x + y", "primals": X}, 422, "invalid_request", "'y'"),
    ("unknown_input", {"expression": "x", "primals": {**X, "z": 1}}, 422, "invalid_request", "'z'"),
    (
        "unknown_tangent",
        {"expression": "x", "primals": X, "tangents": {"q": 1}},
        422,
        "invalid_request",
        "'q'",
    ),
    (
        "tangent_shape",
        {"expression": "x", "primals": X, "tangents": {"x": [[1.0, 2.0]]}},
        422,
        "invalid_request",
        "Expected tangent 'x' of shape [2, 2], got [1, 2]",
    ),
    (
        "model_input_shape",
        {"model": "linear", "primals": {"x": [[1.0] * 4]}},
        422,
        "invalid_request",
        "Expected input 'x' of shape [-1, 5]",
    ),
    (
        "model_unknown_param",
        {"model": "linear", "primals": {"x": [[1.0] * 5]}, "parameter_tangents": {"w": [1.0]}},
        422,
        "invalid_request",
        "'w'",
    ),
    (
        "model_param_shape",
        {"model": "linear", "primals": {"x": [[1.0] * 5]}, "parameter_tangents": {"bias": [1.0]}},
        422,
        "invalid_request",
        "Expected parameter tangent 'bias' of shape [5], got [1]",
    ),
    (
        "param_tangents_on_expression",
        {"expression": "x", "primals": X, "parameter_tangents": {"w": 1}},
        422,
        "invalid_request",
        "models only",
    ),
    (
        "bad_base64",
        {"expression": "x", "primals": {"x": {"shape": [1], "dtype": "float32", "b64": "***"}}},
        422,
        "invalid_request",
        "base64",
    ),
    (
        "b64_byte_count",
        {
            "expression": "x",
            "primals": {"x": {"shape": [2], "dtype": "float32", "b64": "AAAAAA=="}},
        },
        422,
        "invalid_request",
        "needs 8 bytes; its b64 holds 4",
    ),
    (
        "shape_data_mismatch",
        {
            "expression": "x",
            "primals": {"x": {"shape": [2, 2], "dtype": "float32", "data": [1, 2, 3]}},
        },
        422,
        "invalid_request",
        "needs 4 values; its data has 3",
    ),
    (
        "ragged",
        {"expression": "x", "primals": {"x": [[1, 2], [3]]}},
        422,
        "invalid_request",
        "rectangular",
    ),
    (
        "strings_in_data",
        {"expression": "x", "primals": {"x": ["one", 2]}},
        422,
        "invalid_request",
        "'one'",
    ),
    (
        "booleans",
        {"expression": "x", "primals": {"x": [True, False]}},
        422,
        "invalid_request",
        "numbers",
    ),
    (
        "unknown_dtype",
        {"expression": "x", "primals": X, "options": {"dtype": "int8"}},
        422,
        "invalid_request",
        "Unknown dtype 'int8'",
    ),
    (
        "unknown_tensor_dtype",
        {"expression": "x", "primals": {"x": {"shape": [1], "dtype": "float8", "data": [1]}}},
        422,
        "invalid_request",
        "Unknown dtype 'float8'",
    ),
    (
        "no_cuda",
        {"expression": "x", "primals": X, "options": {"device": "cuda:7"}},
        422,
        "invalid_request",
        "not available on this machine",
    ),
    (
        "bad_device",
        {"expression": "x", "primals": X, "options": {"device": "tpu"}},
        422,
        "invalid_request",
        "tpu",
    ),
    (
        "bad_engine",
        {"expression": "x", "primals": X, "options": {"engine": "reverse"}},
        422,
        "invalid_request",
        "options.engine",
    ),
    (
        "unknown_option",
        {"expression": "x", "primals": X, "options": {"dtyp": "float64"}},
        422,
        "invalid_request",
        "options.dtyp",
    ),
    ("missing_primals", {"expression": "x"}, 422, "invalid_request", "primals"),
    (
        "shape_mismatch_in_compute",
        {"expression": "x @ y", "primals": {"x": [[1.0, 2.0]], "y": [[1.0, 2.0]]}},
        422,
        "invalid_request",
        "computation failed",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "type_", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_create_jvp_rejects_bad_input(
    client: TestClient, body: dict, status: int, type_: str, message: str
) -> None:
    r = client.post("/jvp", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_
    assert message in error["message"]
    assert set(error) == {"type", "message", "param"}
    # ...and the service still answers.
    ok = client.post(
        "/jvp", json={"expression": "x * 2", "primals": {"x": [1.0]}, "tangents": {"x": [1.0]}}
    )
    assert ok.status_code == 200 and ok.json()["jvp"]["data"] == [2.0]


def test_create_jvp_rejects_non_json_body(client: TestClient) -> None:
    r = client.post("/jvp", content=b"x = 1", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request"
    assert "not valid JSON" in r.json()["error"]["message"]


def test_create_jvp_rejects_body_that_is_not_an_object(client: TestClient) -> None:
    r = client.post("/jvp", json=[1, 2, 3])
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"


def test_unknown_route_is_not_found_in_the_envelope(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404
    assert r.json() == {
        "error": {"type": "not_found", "message": "No route GET /nope", "param": None}
    }


def test_read_model_unknown_is_404(client: TestClient) -> None:
    r = client.get("/models/nope")
    assert r.status_code == 404
    assert "Unknown model 'nope'" in r.json()["error"]["message"]


def test_create_jvp_over_element_limit_is_413() -> None:
    from tests.conftest import make_client

    with make_client(max_tensor_elements=10) as c:
        r = c.post("/jvp", json={"expression": "x", "primals": {"x": list(range(11))}})
        assert r.status_code == 413
        assert "11 elements; the limit is 10" in r.json()["error"]["message"]
        r = c.post(
            "/jvp",
            json={
                "expression": "x",
                "primals": {"x": {"shape": [100, 100], "dtype": "float32", "b64": ""}},
            },
        )
        assert r.status_code == 413  # checked from the shape, before any bytes are decoded
