"""API keys: 401 without or with a wrong key, health routes open, admin keys work everywhere."""

from __future__ import annotations

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


def test_basic_scheme_is_not_a_bearer_key(keyed: TestClient) -> None:
    r = keyed.get("/models", headers={"Authorization": "Basic inference-key"})
    assert r.status_code == 401


def test_keys_from_environment_are_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    monkeypatch.setenv("JVP_API_KEYS", "a, b")
    monkeypatch.setenv("JVP_ADMIN_KEYS", '["c"]')
    s = Settings()
    assert s.api_keys == ["a", "b"] and s.admin_keys == ["c"]
