"""What a client cannot hold, against a real uvicorn (issue 15, reproducers 4 and 7).

- With API keys on, a large body without a key is answered 401 from its headers on every
  route: the server's peak RSS (VmHWM) does not grow by the body, and the connection closes.
- A body that stops arriving gets 408 ``timeout`` within JVP_BODY_TIMEOUT_S and its
  connection closes, however many such connections there are.
- uvicorn's limit_concurrency and timeout_keep_alive come from JVP_LIMIT_CONCURRENCY and
  JVP_TIMEOUT_KEEP_ALIVE_S.
After each, a correct small JVP is answered.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer

KEYS = {"JVP_API_KEYS": "inference-key", "JVP_ADMIN_KEYS": "admin-key"}
INFERENCE = {"Authorization": "Bearer inference-key"}
BODY_TIMEOUT_S = 1.5
SLACK_S = 5.0


def vm_hwm_mib(pid: int) -> float:
    """The process's peak resident set size (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def small_jvp_is_right(server: LiveServer, headers: dict[str, str] | None = None) -> None:
    """x**3 at x = [2, -1] in the direction [1, 0.5]: jvp = 3 x**2 v = [12, 1.5]."""
    r = httpx.post(
        f"{server.url}/jvp",
        json={"expression": "x**3", "primals": {"x": [2.0, -1.0]}, "tangents": {"x": [1.0, 0.5]}},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["output"]["data"] == [8.0, -1.0]
    assert r.json()["jvp"]["data"] == [12.0, 1.5]


def head(method: str, path: str, length: int, extra: str = "") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers, body."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    raw, _, body = data.partition(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """True once the server has closed the connection (EOF or reset) within timeout_s."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- the key before the body ------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    server = LiveServer(KEYS)
    try:
        yield server
    finally:
        server.stop()


BODY_MB = 64
# A JSON body of 64 MB, as a client without a key would send it: read and parsed, it cost
# the server about 6x its size (issue 15, reproducer 4).
BIG = b'{"expression": "x", "primals": {"x": [' + b"0.5," * (BODY_MB * 2**18 - 20) + b"0.5]}}"
KEYED_ROUTES = [
    ("POST", "/jvp", None),
    ("POST", "/jobs", None),
    ("POST", "/jacobian", None),
    ("POST", "/hvp", None),
    ("POST", "/linearize", None),
    ("POST", "/linearize/some-session/jvp", None),
    ("POST", "/models/some-model/load", "Authorization: Bearer inference-key\r\n"),
]


def send_unauthorized(server: LiveServer, method: str, path: str, extra: str | None):
    """Send BIG without a (sufficient) key, reading the answer while the body streams."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(head(method, path, len(BIG), extra or ""))

        def push() -> None:
            try:
                sock.sendall(BIG)
            except OSError:
                pass  # the server closed the connection: the rest of the body is not wanted

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        answer = read_response(sock, timeout_s=30)
        closed = closed_by_server(sock, timeout_s=10)
        pusher.join(timeout=30)
        return answer, closed
    finally:
        sock.close()


def test_large_bodies_without_a_key_are_401_before_they_are_read(
    keyed_server: LiveServer,
) -> None:
    small_jvp_is_right(keyed_server, INFERENCE)  # warm: what a served request costs
    before = vm_hwm_mib(keyed_server.process.pid)
    for method, path, extra in KEYED_ROUTES:
        (status, headers, body), closed = send_unauthorized(keyed_server, method, path, extra)
        error = json.loads(body)["error"]
        if extra:  # an inference key on an admin route
            assert (status, error["type"]) == (403, "forbidden"), (path, body)
            assert "needs an admin key" in error["message"]
        else:
            assert (status, error["type"]) == (401, "unauthorized"), (path, body)
            assert "Authorization: Bearer <key>" in error["message"]
            assert headers["www-authenticate"] == "Bearer"
        assert headers["connection"] == "close", path
        assert closed, f"{path}: the connection stayed open for the rest of the body"
    grown = vm_hwm_mib(keyed_server.process.pid) - before
    assert grown < 200, f"peak RSS grew by {grown:.0f} MiB over {len(KEYED_ROUTES)} bodies"
    small_jvp_is_right(keyed_server, INFERENCE)


# --- a body that stops arriving; uvicorn's connection limits ------------------------------


@pytest.fixture(scope="module")
def slow_server() -> Iterator[LiveServer]:
    server = LiveServer(
        {
            "JVP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "JVP_LIMIT_CONCURRENCY": "16",
            "JVP_TIMEOUT_KEEP_ALIVE_S": "1",
        }
    )
    try:
        yield server
    finally:
        server.stop()


def stalled(server: LiveServer, path: str = "/jvp", sent: int = 100) -> socket.socket:
    """A connection that declares a 1000-byte body, sends ``sent`` bytes of it, and stops."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(head("POST", path, 1000) + b'{"expression": "x", "primals": ' + b" " * (sent - 31))
    return sock


@pytest.mark.parametrize("path", ["/jvp", "/jobs", "/jacobian"])
def test_body_that_stops_arriving_is_408_and_the_connection_closes(
    slow_server: LiveServer, path: str
) -> None:
    sock = stalled(slow_server, path)
    try:
        started = time.monotonic()
        status, headers, body = read_response(sock, timeout_s=BODY_TIMEOUT_S + SLACK_S)
        waited = time.monotonic() - started
        assert closed_by_server(sock, timeout_s=SLACK_S)
    finally:
        sock.close()
    assert status == 408, body
    assert json.loads(body)["error"] == {
        "type": "timeout",
        "message": "The request body stopped arriving: 100 of 1000 bytes came in "
        f"{BODY_TIMEOUT_S:g} s, the limit (JVP_BODY_TIMEOUT_S)",
        "param": "body",
    }
    assert headers["connection"] == "close"
    assert BODY_TIMEOUT_S - 0.2 <= waited <= BODY_TIMEOUT_S + SLACK_S
    small_jvp_is_right(slow_server)


def test_many_stalled_bodies_do_not_stay_open(slow_server: LiveServer) -> None:
    socks = [stalled(slow_server) for _ in range(12)]
    try:
        deadline = time.monotonic() + BODY_TIMEOUT_S + SLACK_S
        for sock in socks:
            status, _, _ = read_response(sock, timeout_s=max(deadline - time.monotonic(), 0.1))
            assert status == 408
            assert closed_by_server(sock, timeout_s=max(deadline - time.monotonic(), 0.1))
    finally:
        for sock in socks:
            sock.close()
    assert len(os.listdir(f"/proc/{slow_server.process.pid}/fd")) < 100  # nothing piled up
    small_jvp_is_right(slow_server)


def test_connections_past_limit_concurrency_get_503_at_once(slow_server: LiveServer) -> None:
    # uvicorn counts the new connection too: 16 open ones leave no room for a 17th.
    socks = [stalled(slow_server) for _ in range(16)]
    try:
        time.sleep(0.3)  # every connection accepted
        r = httpx.get(f"{slow_server.url}/healthz", timeout=10)
        assert r.status_code == 503, r.text
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + SLACK_S
    while httpx.get(f"{slow_server.url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the closed connections still count"
        time.sleep(0.1)
    small_jvp_is_right(slow_server)


def test_idle_kept_alive_connection_is_closed_after_timeout_keep_alive(
    slow_server: LiveServer,
) -> None:
    sock = socket.create_connection(("127.0.0.1", slow_server.port))
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = read_response(sock, timeout_s=10)
        assert status == 200 and headers.get("connection") != "close"
        started = time.monotonic()
        assert closed_by_server(sock, timeout_s=SLACK_S)
        assert time.monotonic() - started >= 0.5  # kept open a while, then closed (1 s)
    finally:
        sock.close()
    small_jvp_is_right(slow_server)
