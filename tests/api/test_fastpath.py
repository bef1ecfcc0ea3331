"""POST /jvp past the framework (NOTE [POST /jvp past the framework] in app/api/fastpath.py)
answers exactly as the FastAPI route does: same statuses, bodies, headers and metrics."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_client

KEY = "k-123"
SAFETENSORS = "application/x-safetensors"


def _safetensors_body() -> bytes:
    import json

    import safetensors.numpy

    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    return safetensors.numpy.save(
        {"primals/x": x, "tangents/x": np.ones_like(x)},
        metadata={"request": json.dumps({"expression": "x * x"})},
    )


# (name, request kwargs): good requests in every form, and one of each kind of error.
JSON = {"Content-Type": "application/json"}
B64 = base64.b64encode(np.array([0.5, 1.5]).tobytes()).decode()
CASES: list[tuple[str, dict[str, Any]]] = [
    (
        "lists",
        {
            "json": {
                "expression": "x**2 + y",
                "primals": {"x": [1.0, 2.0], "y": [3.0, 4.0]},
                "tangents": {"x": [1.0, 1.0]},
            }
        },
    ),
    (
        "b64",
        {
            "json": {
                "expression": "sin(x)",
                "primals": {"x": {"shape": [2], "dtype": "float64", "b64": B64}},
                "tangents": {"x": [1.0, 0.0]},
                "options": {"encoding": "b64"},
            }
        },
    ),
    (
        "model",
        {"json": {"model": "linear", "primals": {"x": [[0.1] * 5]}, "tangents": {"x": [[1] * 5]}}},
    ),
    ("safetensors", {"content": _safetensors_body(), "headers": {"Content-Type": SAFETENSORS}}),
    ("not json", {"content": b"{nope", "headers": JSON}),
    ("missing field", {"json": {"expression": "x"}}),
    ("bad expression", {"json": {"expression": "__import__('os')", "primals": {"x": [1.0]}}}),
    ("unknown model", {"json": {"model": "nope", "primals": {"x": [1.0]}}}),
    ("wrong media type", {"content": b"x=1", "headers": {"Content-Type": "text/plain"}}),
    ("too large", {"content": b"[" + b"1," * 600 + b"1]", "headers": JSON}),
    (
        "no key",
        {"json": {"expression": "x", "primals": {"x": [1.0]}}, "headers": {"Authorization": ""}},
    ),
]


def _answer(c: TestClient, kwargs: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-ID": "same-id"}
    headers.update(kwargs.get("headers", {}))
    headers = {k: v for k, v in headers.items() if v}
    r = c.post("/jvp", **{**kwargs, "headers": headers})
    kept = {
        k: r.headers[k]
        for k in ("content-type", "x-request-id", "www-authenticate")
        if k in r.headers
    }
    if r.headers["content-type"].startswith(SAFETENSORS):
        import safetensors.numpy

        body: Any = {k: v.tolist() for k, v in safetensors.numpy.load(r.content).items()}
    else:
        body = r.json()
        body.pop("timing_ms", None)
    return r.status_code, kept, body


@pytest.fixture(scope="module")
def both() -> Any:
    common = {"api_keys": [KEY], "max_body_bytes": 1000}
    with (
        make_client(**common) as fast,
        make_client(**common, opentelemetry=True) as routed,
    ):
        assert fast.app.jvp_stack is not None  # type: ignore[attr-defined]
        assert routed.app.jvp_stack is None  # type: ignore[attr-defined]
        yield fast, routed


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[name for name, _ in CASES])
def test_create_jvp_answers_as_the_route_does(both: Any, name: str, kwargs: dict[str, Any]) -> None:
    fast, routed = both
    if name == "safetensors":
        kwargs = {**kwargs, "headers": {**kwargs["headers"], "Accept": SAFETENSORS}}
    assert _answer(fast, kwargs) == _answer(routed, kwargs)


def test_create_jvp_cases_cover_success_and_each_error_status(both: Any) -> None:
    fast, _ = both
    statuses = {name: _answer(fast, kwargs)[0] for name, kwargs in CASES}
    assert statuses == {
        "lists": 200,
        "b64": 200,
        "model": 200,
        "safetensors": 200,
        "not json": 422,
        "missing field": 422,
        "bad expression": 400,
        "unknown model": 404,
        "wrong media type": 415,
        "too large": 413,
        "no key": 401,
    }


def test_create_jvp_fast_path_is_labelled_as_the_route_in_metrics() -> None:
    with make_client() as c:
        for _ in range(3):
            r = c.post("/jvp", json={"expression": "x", "primals": {"x": [1.0]}})
            assert r.status_code == 200
        text = c.get("/metrics").text
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("jvp_http_requests_total{") and 'route="/jvp"' in ln
    )
    assert 'method="POST"' in line and 'status="200"' in line
    assert float(line.rsplit(" ", 1)[1]) == 3.0
