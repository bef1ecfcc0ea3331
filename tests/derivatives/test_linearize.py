"""POST /linearize, POST /linearize/{id}/jvp, DELETE /linearize/{id}: numbers against
torch.func.jvp, and the sessions' TTL and memory limits."""

from __future__ import annotations

import time

import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import jvp

from tests.conftest import make_client
from tests.derivatives.refs import model_function, post, randn, served_weights
from tests.wire import from_wire, to_wire


def test_create_linearized_jvp_expression_matches_jvp(client: TestClient) -> None:
    x, y = randn(3, 4, seed=50), randn(3, 4, seed=51)
    made = post(
        client,
        "/linearize",
        {
            "expression": "sin(x) * exp(y) + x @ transpose(y, 0, 1) @ x",
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "options": {"dtype": "float64"},
        },
    )
    assert made["wrt"] == ["x", "y"] and made["bytes"] > 0 and made["expires_at"].endswith("Z")

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sin(a) * torch.exp(b) + a @ b.T @ a

    torch.testing.assert_close(from_wire(made["output"]), f(x, y), rtol=1e-14, atol=1e-14)
    for seed in (52, 53, 54):
        vx, vy = randn(3, 4, seed=seed), randn(3, 4, seed=seed + 10)
        got = post(
            client,
            f"/linearize/{made['id']}/jvp",
            {"tangents": {"x": to_wire(vx), "y": to_wire(vy)}},
        )
        _, ref = jvp(f, (x, y), (vx, vy))
        torch.testing.assert_close(from_wire(got["jvp"]), ref, rtol=1e-12, atol=1e-12)
    # A missing tangent is zero.
    got = post(client, f"/linearize/{made['id']}/jvp", {"tangents": {"y": to_wire(vy)}})
    _, ref = jvp(lambda b: f(x, b), (y,), (vy,))
    torch.testing.assert_close(from_wire(got["jvp"]), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,width,parameter", [("linear", 5, "weight"), ("mlp", 64, "0.bias")])
def test_create_linearized_jvp_model_batched_with_parameters(
    client: TestClient, name: str, width: int, parameter: str
) -> None:
    x = randn(2, width, seed=55)
    made = post(
        client,
        "/linearize",
        {
            "model": name,
            "primals": {"x": to_wire(x)},
            "wrt": ["x", parameter],
            "options": {"dtype": "float64"},
        },
    )
    p = served_weights(name)[parameter]
    k = 5
    vx, vp = randn(k, 2, width, seed=56), randn(k, *p.shape, seed=57)
    got = post(
        client,
        f"/linearize/{made['id']}/jvp",
        {
            "tangents": {"x": to_wire(vx, "b64")},
            "parameter_tangents": {parameter: to_wire(vp, "b64")},
            "options": {"tangent_batch": True, "encoding": "b64"},
        },
    )
    batched = from_wire(got["jvp"])
    assert batched.shape == (k, 2, 64 if name == "mlp" else 5)
    f = model_function(name, (parameter,))
    for i in range(k):
        _, ref = jvp(f, (x, p), (vx[i], vp[i]))
        torch.testing.assert_close(batched[i], ref, rtol=1e-12, atol=1e-12)
        single = post(
            client,
            f"/linearize/{made['id']}/jvp",
            {"tangents": {"x": to_wire(vx[i])}, "parameter_tangents": {parameter: to_wire(vp[i])}},
        )
        torch.testing.assert_close(batched[i], from_wire(single["jvp"]), rtol=1e-12, atol=1e-12)


def test_create_linearized_jvp_name_outside_wrt_is_422(client: TestClient) -> None:
    made = post(
        client,
        "/linearize",
        {"expression": "x * y", "primals": {"x": [1.0], "y": [2.0]}, "wrt": ["x"]},
    )
    r = client.post(f"/linearize/{made['id']}/jvp", json={"tangents": {"y": [1.0]}})
    assert r.status_code == 422
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": "Unknown name 'y' in tangents; this session is linearized with respect to ['x']",
        "param": "tangents.y",
    }
    r = client.post(f"/linearize/{made['id']}/jvp", json={"tangents": {"x": [1.0, 2.0]}})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "Expected tangent 'x' of shape [1], got [2]"


def test_delete_linearization_then_404(client: TestClient) -> None:
    made = post(client, "/linearize", {"expression": "x**2", "primals": {"x": [3.0]}})
    assert client.delete(f"/linearize/{made['id']}").status_code == 204
    r = client.post(f"/linearize/{made['id']}/jvp", json={"tangents": {"x": [1.0]}})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"
    assert "Unknown or expired linearize session" in r.json()["error"]["message"]
    assert client.delete(f"/linearize/{made['id']}").status_code == 404


def test_create_linearized_jvp_unknown_id_is_404(client: TestClient) -> None:
    r = client.post("/linearize/nope/jvp", json={"tangents": {}})
    assert r.status_code == 404
    assert r.json()["error"]["param"] == "id"


def test_create_linearized_jvp_after_ttl_is_404() -> None:
    with make_client(linearize_ttl_s=30.0) as c:
        store = c.app.state.runtime.services.derivatives.store  # type: ignore[attr-defined]
        now = [1_000_000.0]
        store.clock = lambda: now[0]
        made = post(c, "/linearize", {"expression": "x**2", "primals": {"x": [3.0]}})
        assert made["expires_at"] == "1970-01-12T13:47:10Z"  # 1_000_030 s after the epoch
        now[0] += 29.0
        got = post(c, f"/linearize/{made['id']}/jvp", {"tangents": {"x": [1.0]}})
        assert from_wire(got["jvp"]).tolist() == [6.0]
        now[0] += 1.0  # the TTL has passed: dropped on lookup
        r = c.post(f"/linearize/{made['id']}/jvp", json={"tangents": {"x": [1.0]}})
        assert r.status_code == 404
        assert "sessions live 30 s (JVP_LINEARIZE_TTL_S)" in r.json()["error"]["message"]
        assert len(store) == 0


def test_sweep_drops_expired_sessions() -> None:
    # A TTL long enough that the three sessions all exist before the first expires,
    # even on a loaded machine; the sweep runs every 50 ms.
    with make_client(linearize_ttl_s=3.0, linearize_sweep_s=0.05) as c:
        store = c.app.state.runtime.services.derivatives.store  # type: ignore[attr-defined]
        for _ in range(3):
            post(c, "/linearize", {"expression": "exp(x)", "primals": {"x": [1.0, 2.0]}})
        assert len(store) == 3 and store.used_bytes > 0
        deadline = time.monotonic() + 20.0  # generous: only the outcome is asserted
        while len(store) and time.monotonic() < deadline:
            time.sleep(0.05)  # no request touches the sessions: only the sweeper can drop them
        assert len(store) == 0 and store.used_bytes == 0


def _session_bytes() -> int:
    with make_client() as c:
        return int(post(c, "/linearize", LINEARIZE_MLP)["bytes"])


LINEARIZE_MLP = {"model": "mlp", "primals": {"x": [[0.5] * 64] * 4}}


def test_create_linearization_over_session_limit_is_413() -> None:
    size = _session_bytes()
    with make_client(linearize_max_session_bytes=size - 1) as c:
        r = c.post("/linearize", json=LINEARIZE_MLP)
        assert r.status_code == 413
        message = r.json()["error"]["message"]
        assert f"holds about {size} bytes" in message
        assert f"the limit per session is {size - 1} (JVP_LINEARIZE_MAX_SESSION_BYTES)" in message
        assert len(c.app.state.runtime.services.derivatives.store) == 0  # type: ignore[attr-defined]


def test_create_linearization_over_budget_is_503_until_one_is_deleted() -> None:
    size = _session_bytes()
    with make_client(
        linearize_max_session_bytes=size,
        linearize_budget_bytes=size + size // 2,
        linearize_ttl_s=90,
    ) as c:
        first = post(c, "/linearize", LINEARIZE_MLP)
        r = c.post("/linearize", json=LINEARIZE_MLP)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "overloaded"
        assert "(JVP_LINEARIZE_BUDGET_BYTES)" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 90  # until the first session expires
        assert c.delete(f"/linearize/{first['id']}").status_code == 204
        post(c, "/linearize", LINEARIZE_MLP)  # the budget was given back
