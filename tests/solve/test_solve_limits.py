"""Every limit of POST /solve through HTTP (issue 18, "Done means"), beside those of
test_solve_http.py (JVP_MAX_REQUEST_FLOPS, JVP_MAX_REQUEST_BYTES, JVP_MAX_REQUEST_ELEMENTS
and the deadline at the caps): the body's bytes, elements and dimensions per tensor (the
primals' and the rhs'), the expression's length, nodes and depth, the caps' own ranges, the
request's deadline reached while the solve runs, and over a real socket the API key (401
before the body is read) and a body that stops arriving (408).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.test_limits import LIMITS  # the limits /jvp is tested under
from tests.conftest import LiveServer, make_client
from tests.solve.test_solve_http import wire


@pytest.fixture(scope="module")
def limited() -> Iterator[TestClient]:
    with make_client(job_runner="off", **LIMITS) as c:
        yield c


def cube(n: int = 3, **body: Any) -> dict[str, Any]:
    return {
        "expression": "u**3 - a",
        "primals": {"u": wire([1.0] * n), "a": wire([8.0] * n)},
        "unknowns": ["u"],
        **body,
    }


def assert_error(r: httpx.Response, status: int, type_: str, says: str, param: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_ and says in error["message"], error
    assert error["param"] == param, error


def test_solve_within_the_limits_is_served(limited: TestClient) -> None:
    r = limited.post("/solve", json=cube())
    assert r.status_code == 200, r.text
    assert r.json()["converged"] is True


def test_solve_body_over_the_byte_limit_is_413(limited: TestClient) -> None:
    body = cube(primals={"u": [1.0] * 5, "a": [8.0] * 5}, options={"tol": 1e-10})
    body["expression"] = "u**3 - a" + " " * 4096
    r = limited.post("/solve", json=body)
    assert_error(r, 413, "too_large", "the limit is 4096 bytes (JVP_MAX_BODY_BYTES)", "body")


def test_solve_primal_over_the_tensor_element_limit_is_413(limited: TestClient) -> None:
    body = cube(primals={"u": wire([1.0] * 11), "a": wire([8.0])})
    r = limited.post("/solve", json=body)
    assert_error(
        r, 413, "too_large", "Tensor 'primals.u' has 11 elements; the limit is 10", "primals.u"
    )


def test_solve_rhs_over_the_tensor_element_limit_is_413(limited: TestClient) -> None:
    r = limited.post("/solve", json=cube(method="linear", rhs=wire([1.0] * 11)))
    assert_error(r, 413, "too_large", "Tensor 'rhs' has 11 elements; the limit is 10", "rhs")


def test_solve_rhs_counts_toward_the_request_element_limit(limited: TestClient) -> None:
    # 8 + 8 primal elements are within 20; the rhs' 8 more are not (as /vjp's cotangents).
    body = cube(8, method="linear", rhs=wire([1.0] * 8))
    r = limited.post("/solve", json=body)
    assert_error(
        r, 413, "too_large", "The request holds 24 tensor elements; the limit is 20", "rhs"
    )
    r = limited.post("/solve", json=cube(5, method="linear", rhs=wire([3.0] * 5)))
    assert r.status_code == 200, r.text  # 15 elements: J = diag(3) at u = 1, δ = 1
    assert r.json()["solution"]["u"]["data"] == pytest.approx([1.0] * 5, abs=1e-12)


def test_solve_rhs_over_the_dimension_limit_is_413(limited: TestClient) -> None:
    r = limited.post("/solve", json=cube(method="linear", rhs=[[[1.0, 1.0, 1.0]]]))
    assert_error(r, 413, "too_large", "Tensor 'rhs' has 3 dimensions; the limit is 2", "rhs")


def test_solve_primal_over_the_dimension_limit_is_413(limited: TestClient) -> None:
    body = cube(primals={"u": [[[1.0]]], "a": [[[8.0]]]})
    r = limited.post("/solve", json=body)
    assert r.status_code == 413, r.text
    assert "has 3 dimensions; the limit is 2" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("u**3 - a" + " + 0 * u" * 8, "characters; the limit is 60"),
        ("((u+u)+(u+u))+((u+u)+(u+u))+((u+u)+(u+u)) - a", "nodes; the limit is 20"),
        ("sin(sin(sin(sin(sin(sin(u)))))) - a", "nested 8 levels deep; the limit is 6"),
    ],
)
def test_solve_expression_over_its_limits_is_413(
    limited: TestClient, expression: str, says: str
) -> None:
    r = limited.post("/solve", json=cube(expression=expression))
    assert_error(r, 413, "too_large", says, "expression")


@pytest.mark.parametrize(
    "options",
    [
        {"max_iterations": 10_001},
        {"max_krylov": 0},
        {"max_krylov": 100_001},
        {"restart": 0},
        {"restart": 1001},
    ],
)
def test_solve_caps_out_of_their_range_are_422(limited: TestClient, options: dict) -> None:
    r = limited.post("/solve", json=cube(options=options))
    assert r.status_code == 422, r.text
    (name,) = options
    assert r.json()["error"]["type"] == "invalid_request"
    assert name in r.json()["error"]["param"], r.json()["error"]


def test_solve_past_its_deadline_while_it_runs_is_504() -> None:
    # Each product is a few elements, so the caps' estimate fits in the deadline; but
    # Newton on u² + 1 = 0 (no real root; no line search, so it never stops for lack of a
    # decrease) runs until the caps: 10,000 iterations take longer than 0.5 s. The solve
    # checks the deadline before each product (NOTE [a solve's deadline]).
    with make_client(job_runner="off", request_timeout_s=0.5) as c:
        body = {
            "expression": "u**2 + 1",
            "primals": {"u": wire([0.3, -1.7])},
            "unknowns": ["u"],
            "options": {"max_iterations": 10_000, "line_search": False},
        }
        shaped = c.post("/eval_shape", json={**body, "operation": "solve"})
        assert shaped.status_code == 200, shaped.text  # within the limits before it runs
        started = time.monotonic()
        r = c.post("/solve", json=body)
        took = time.monotonic() - started
        # The solve stopped: the device worker is free for the next request at once (the
        # whole 10,000 iterations take about 3 s here).
        started = time.monotonic()
        after = c.post("/solve", json=cube())
        next_took = time.monotonic() - started
    assert after.status_code == 200 and after.json()["converged"] is True, after.text
    assert next_took < 1.5, f"the next solve waited {next_took:.2f} s: the 504 did not stop it"
    # Stopped by the solve's check or by the await, whichever came first: either 504 says
    # what to do.
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["type"] == "timeout", error
    message = error["message"]
    assert "The solve" in message and "deadline" in message, message
    assert "JVP_REQUEST_TIMEOUT_S" in message and '"operation": "solve"' in message, message
    assert took < 5.0


def test_solve_needs_a_key_before_its_body_and_a_body_that_stops_is_408() -> None:
    server = LiveServer(env={"JVP_API_KEYS": "k1", "JVP_BODY_TIMEOUT_S": "1"})
    try:

        def send(head: str, part: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(head.encode() + part)  # the rest of the body never comes
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                return answer

        head = (
            "POST /solve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n{auth}\r\n"
        )
        started = time.monotonic()
        no_key = send(head.format(auth=""), b'{"expression": "u')
        assert no_key.startswith(b"HTTP/1.1 401"), no_key
        assert b'"unauthorized"' in no_key
        assert time.monotonic() - started < 1.0  # answered without waiting for the body
        started = time.monotonic()
        stalled = send(head.format(auth="Authorization: Bearer k1\r\n"), b'{"expression": "u')
        assert stalled.startswith(b"HTTP/1.1 408"), stalled
        assert b"JVP_BODY_TIMEOUT_S" in stalled
        assert 0.9 <= time.monotonic() - started < 5.0
        ok = httpx.post(
            f"{server.url}/solve",
            json=cube(),
            headers={"Authorization": "Bearer k1"},
            timeout=30,
        )
        assert ok.status_code == 200 and ok.json()["converged"] is True
    finally:
        server.stop()
