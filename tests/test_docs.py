"""The schema and its pages without a browser: the Bearer scheme in the schema, who may open
what with keys on (JVP_DOCS_PUBLIC), and that the pages name no other host."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.conftest import make_client


def _security(client: TestClient, headers: dict[str, str] | None = None) -> dict[str, object]:
    schema = client.get("/openapi.json", headers=headers).json()
    scheme = schema["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    return {
        f"{method} {path}": operation.get("security")
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }


def test_schema_declares_the_bearer_scheme_on_every_keyed_operation(client: TestClient) -> None:
    # Keys off: the key is optional ({} allows no scheme), as the service answers.
    for operation, security in _security(client).items():
        open_route = operation.endswith(("/healthz", "/readyz"))
        assert security == (None if open_route else [{"bearer": []}, {}]), operation
    with make_client(api_keys=["k"]) as keyed:
        for operation, security in _security(keyed, {"Authorization": "Bearer k"}).items():
            open_route = operation.endswith(("/healthz", "/readyz"))
            assert security == (None if open_route else [{"bearer": []}]), operation


def test_docs_public_opens_the_pages_not_the_schema() -> None:
    with make_client(api_keys=["k"], docs_public=True) as c:
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert c.get(page).status_code == 200, page
        assert c.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        r = c.get("/openapi.json")
        assert r.status_code == 401
        assert "Authorization: Bearer" in r.json()["error"]["message"]
        assert c.get("/openapi.json", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/models").status_code == 401


def test_docs_need_a_key_by_default_when_keys_are_on() -> None:
    with make_client(api_keys=["k"]) as c:
        assert c.get("/docs").status_code == 401
        assert c.get("/redoc").status_code == 401
        assert c.get("/docs", headers={"Authorization": "Bearer k"}).status_code == 200


def test_pages_load_nothing_from_another_host(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
        assert "http://" not in r.text and "https://" not in r.text
        for source in sources:
            assert client.get(source).status_code == 200, source
