"""Errors on every body route as clear as on /jvp: `curl -d` without a content type is a 415
naming the route and what it takes, and invalid JSON says where (line and column)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient

from tests.api.test_malformed import body_routes
from tests.conftest import LiveServer

BAD_JSON = '{\n  "expression": "x**2",\n  "primals": {"x": [1, 2}\n}'  # "}" for "]" on line 3


def test_every_body_route_refuses_a_form_body_with_415(client: TestClient) -> None:
    routes = body_routes(client)
    assert {"/jvp", "/jobs", "/jacobian", "/hvp", "/linearize", "/eval_shape"} <= set(routes)
    for path in routes:
        r = client.post(
            path,
            content=b'{"expression": "x"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 415, (path, r.text)
        error = r.json()["error"]
        assert error["type"] == "unsupported_media_type"
        assert error["param"] == "Content-Type"
        assert "'application/x-www-form-urlencoded'" in error["message"]
        assert "application/json" in error["message"]
        assert path == "/jvp" or f"POST {path}" in error["message"], error["message"]


def test_every_body_route_says_where_its_json_is_invalid(client: TestClient) -> None:
    for path in body_routes(client):
        r = client.post(path, content=BAD_JSON, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"] == {
            "type": "invalid_request",
            "message": "The body is not valid JSON: unexpected character, expected ',' or ']' "
            "at line 3, column 25",
            "param": "body",
        }, path


def test_schema_documents_the_415_of_every_body_route(client: TestClient) -> None:
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                assert "415" in operation["responses"], (method, path)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
def test_curl_d_without_content_type_is_a_415(live_server: LiveServer) -> None:
    body = '{"model": "linear", "primals": {"x": [[1, 2, 3, 4, 5]]}}'
    result = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", f"{live_server.url}/jacobian", "-d", body],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer, status = result.stdout.rsplit("\n", 1)
    assert status == "415"
    assert json.loads(answer)["error"]["message"] == (
        "Unsupported Content-Type 'application/x-www-form-urlencoded' for POST /jacobian; "
        "expected application/json"
    )
