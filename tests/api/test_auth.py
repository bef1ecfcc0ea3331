"""API keys: 401 without or with a wrong key, health routes open, admin keys work everywhere."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_client

JVP = {"expression": "x * 3", "primals": {"x": [1.0]}, "tangents": {"x": [1.0]}}
ROUTES = [("post", "/jvp", JVP), ("get", "/models", None), ("get", "/models/linear", None)]


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with make_client(api_keys=["inference-key"], admin_keys=["admin-key"]) as c:
        yield c


def call(c: TestClient, method: str, path: str, body: dict | None, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return c.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_routes_without_key_are_401(
    keyed: TestClient, method: str, path: str, body: dict | None
) -> None:
    r = call(keyed, method, path, body, None)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "unauthorized"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_routes_with_wrong_key_are_401(
    keyed: TestClient, method: str, path: str, body: dict | None
) -> None:
    r = call(keyed, method, path, body, "guess")
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "The API key is not valid"


@pytest.mark.parametrize("key", ["inference-key", "admin-key"])
@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_routes_with_valid_key_answer(
    keyed: TestClient, method: str, path: str, body: dict | None, key: str
) -> None:
    assert call(keyed, method, path, body, key).status_code == 200


def test_health_routes_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(keyed: TestClient, scheme: str) -> None:
    # RFC 9110 section 11.1: an authentication scheme is a case-insensitive token; the key
    # itself is compared exactly.
    r = keyed.get("/models", headers={"Authorization": f"{scheme} inference-key"})
    assert r.status_code == 200, r.text
    wrong = keyed.get("/models", headers={"Authorization": f"{scheme} INFERENCE-KEY"})
    assert wrong.status_code == 401


def test_basic_scheme_is_not_a_bearer_key(keyed: TestClient) -> None:
    r = keyed.get("/models", headers={"Authorization": "Basic inference-key"})
    assert r.status_code == 401


def test_keys_from_environment_are_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    monkeypatch.setenv("JVP_API_KEYS", "a, b")
    monkeypatch.setenv("JVP_ADMIN_KEYS", '["c"]')
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.admin_keys == ["c"]


# --- every route, found from the app itself (new routes are covered without editing this) ---

OPEN_ROUTES = {"/healthz", "/readyz"}


def _needs_admin(dependant: object) -> bool:
    from app.api.auth import require_admin

    stack = [dependant]
    while stack:
        d = stack.pop()
        if getattr(d, "call", None) is require_admin:
            return True
        stack.extend(getattr(d, "dependencies", []))
    return False


def app_routes(app: object) -> list[tuple[str, str, bool]]:
    """(method, path with sample path parameters, needs an admin key) for every route."""
    from fastapi import routing

    routes = getattr(app, "routes", [])
    # FastAPI >= 0.12x wraps included routers; iter_route_contexts unwraps them.
    contexts = (
        routing.iter_route_contexts(routes) if hasattr(routing, "iter_route_contexts") else routes
    )
    found = []
    for route in contexts:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if not path or not methods:
            continue
        sample = re.sub(r"\{[^}:]+(:[^}]+)?\}", "sample", path)
        admin = _needs_admin(getattr(route, "dependant", None))
        found += [(m, sample, admin) for m in sorted(methods) if m != "HEAD"]
    return found


def test_app_routes_finds_every_kind_of_route(keyed: TestClient) -> None:
    found = {(m, p) for m, p, _ in app_routes(keyed.app)}
    for expected in [
        ("POST", "/jvp"),
        ("GET", "/models"),
        ("GET", "/models/sample"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/healthz"),
    ]:
        assert expected in found


def keyed_routes() -> list[tuple[str, str, bool]]:
    from app.api.app import create_app

    return [r for r in app_routes(create_app()) if r[1] not in OPEN_ROUTES]


@pytest.mark.parametrize(("method", "path", "admin"), keyed_routes())
def test_every_route_without_key_is_401(
    keyed: TestClient, method: str, path: str, admin: bool
) -> None:
    r = keyed.request(method, path)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "unauthorized"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "admin"), keyed_routes())
def test_every_route_with_wrong_key_is_401(
    keyed: TestClient, method: str, path: str, admin: bool
) -> None:
    r = keyed.request(method, path, headers={"Authorization": "Bearer guess"})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == {
        "type": "unauthorized",
        "message": "The API key is not valid",
        "param": None,
    }


@pytest.mark.parametrize(("method", "path", "admin"), keyed_routes())
def test_every_route_with_inference_key_passes_or_is_403_for_admin(
    keyed: TestClient, method: str, path: str, admin: bool
) -> None:
    r = keyed.request(method, path, headers={"Authorization": "Bearer inference-key"})
    if admin:
        assert r.status_code == 403, r.text
        assert r.json()["error"]["type"] == "forbidden"
        assert "admin key" in r.json()["error"]["message"]
    else:
        assert r.status_code not in (401, 403), r.text


@pytest.mark.parametrize(("method", "path", "admin"), keyed_routes())
def test_every_route_with_admin_key_passes_auth(
    keyed: TestClient, method: str, path: str, admin: bool
) -> None:
    r = keyed.request(method, path, headers={"Authorization": "Bearer admin-key"})
    assert r.status_code not in (401, 403), r.text


def test_metrics_public_setting_opens_metrics_only() -> None:
    with make_client(api_keys=["k"], metrics_public=True) as c:
        r = c.get("/metrics")
        assert r.status_code == 200
        assert "jvp_http_requests_total" in r.text
        assert c.get("/models").status_code == 401
        assert c.get("/openapi.json").status_code == 401


def test_docs_routes_are_open_without_keys(client: TestClient) -> None:
    assert client.get("/openapi.json").json()["paths"]["/jvp"]["post"]
    assert "swagger-ui" in client.get("/docs").text
    assert "redoc" in client.get("/redoc").text
    assert client.get("/metrics").status_code == 200


# --- the key before the body (issue 15, reproducer 4) -----------------------------------


def _call_unread(app: object, method: str, path: str, headers: list[tuple[bytes, bytes]]):
    """Call the ASGI app with a body it must not read; (status, body read?)."""
    import asyncio

    read = []
    sent: list[dict] = []

    async def receive() -> dict:
        read.append(True)
        return {"type": "http.request", "body": b"[" * 1000, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [(b"content-length", b"104857600"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), bool(read)


@pytest.mark.parametrize("fast", [True, False], ids=["fastpath", "routed"])
def test_every_route_refuses_a_missing_or_inference_key_without_reading_the_body(
    fast: bool,
) -> None:
    from app.api.app import create_app
    from app.settings import Settings

    app = create_app(
        Settings(api_keys=["inference-key"], admin_keys=["admin-key"], opentelemetry=not fast)
    )
    routes = [r for r in app_routes(app) if r[1] not in OPEN_ROUTES]
    assert {p for _, p, _ in routes} >= {"/jvp", "/jobs", "/jacobian", "/hvp", "/linearize"}
    inference = [(b"authorization", b"Bearer inference-key")]
    for method, path, admin in routes:
        status, headers, read = _call_unread(app, method, path, [])
        assert (status, read) == (401, False), (method, path)
        assert headers[b"connection"] == b"close"  # uvicorn drops the rest of the body
        if admin:
            assert _call_unread(app, method, path, inference)[::2] == (403, False), path
