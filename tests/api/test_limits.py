"""Every limit answers 413 (too_large) naming the limit; an out-of-memory frees what it held.

Limits: body bytes (by Content-Length, and counted while a chunked body streams,
in-process and through a real uvicorn), elements per tensor and per request,
dimensions, expression length, nodes and depth.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.api.middleware import BodyLimitMiddleware
from app.settings import Settings
from tests.conftest import LiveServer, make_client
from tests.test_faults import serve

LIMITS = {
    "max_body_bytes": 4096,
    "max_tensor_elements": 10,
    "max_request_elements": 20,
    "max_dims": 2,
    "max_expression_length": 60,
    "max_expression_nodes": 20,
    "max_expression_depth": 6,
}


@pytest.fixture(scope="module")
def limited() -> Iterator[TestClient]:
    with make_client(**LIMITS) as c:
        yield c


def jvp(expression: str = "x * 2", x: object = (1.0,), t: object = None) -> dict[str, object]:
    x = list(x) if isinstance(x, tuple) else x
    body: dict[str, object] = {"expression": expression, "primals": {"x": x}}
    if t is not None:
        body["tangents"] = {"x": t}
    return body


def assert_too_large(r: httpx.Response, message: str, param: str | None) -> None:
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {"type": "too_large", "message": message, "param": param}


def test_settings_body_limit_defaults_to_256_mib() -> None:
    assert Settings().max_body_bytes == 256 * 1024 * 1024


def test_create_jvp_body_over_content_length_limit_is_413(limited: TestClient) -> None:
    body = b'{"expression": "x", "primals": {"x": [' + b"1.0, " * 1000 + b"1.0]}}"
    r = limited.post("/jvp", content=body, headers={"content-type": "application/json"})
    assert_too_large(
        r,
        f"The request body has {len(body)} bytes; the limit is 4096 bytes (JVP_MAX_BODY_BYTES)",
        "body",
    )
    assert r.headers["x-request-id"]


def test_create_jvp_chunked_body_over_limit_is_413(limited: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"expression": "x", "primals": {"x": ['
        for _ in range(200):
            yield b"1.0, " * 10

    r = limited.post("/jvp", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.request.headers
    assert_too_large(
        r,
        "The request body passed 4096 bytes; the limit is 4096 bytes (JVP_MAX_BODY_BYTES)",
        "body",
    )


def test_body_limit_stops_reading_once_chunks_pass_limit() -> None:
    pulled = 0
    messages: list[dict] = []

    async def endless_body() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 50, "more_body": True}

    async def reads_everything(scope: dict, receive: object, send: object) -> None:
        while (await receive())["more_body"]:  # type: ignore[operator]
            pass

    async def send(message: dict) -> None:
        messages.append(message)

    limit = BodyLimitMiddleware(reads_everything, max_body_bytes=120)
    scope = {"type": "http", "method": "POST", "path": "/jvp", "headers": []}
    asyncio.run(limit(scope, endless_body, send))
    assert pulled == 3  # 150 bytes > 120: nothing more was read
    assert messages[0]["status"] == 413
    assert json.loads(messages[1]["body"])["error"]["message"] == (
        "The request body passed 120 bytes; the limit is 120 bytes (JVP_MAX_BODY_BYTES)"
    )


def _run_with_body(chunks: list[bytes | None], app_waits_for_disconnect: bool = False):
    """BodyLimitMiddleware (1 s body deadline) over an app that reads the whole body;
    None in ``chunks`` is a body that stops arriving there. (status, body, reads)."""
    sent: list[dict] = []
    reads: list[int] = []

    async def receive() -> dict:
        if len(reads) < len(chunks) and chunks[len(reads)] is None:
            await asyncio.sleep(3600)  # stops arriving
        i = len(reads)
        reads.append(i)
        if i >= len(chunks):
            await asyncio.sleep(1.5)  # the client goes away, later than the deadline
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    async def app(scope: dict, receive: object, send: object) -> None:
        while (await receive())["more_body"]:  # type: ignore[operator]
            await asyncio.sleep(0.05)
        if app_waits_for_disconnect:
            assert (await receive())["type"] == "http.disconnect"  # type: ignore[operator]
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    async def send(message: dict) -> None:
        sent.append(message)

    limit = BodyLimitMiddleware(app, max_body_bytes=1000, body_timeout_s=1.0)
    scope = {"type": "http", "method": "POST", "path": "/jvp", "headers": []}
    started = time.monotonic()
    asyncio.run(limit(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], time.monotonic() - started


def test_body_that_stops_arriving_is_408_within_the_deadline() -> None:
    status, body, took = _run_with_body([b"abc", b"de", None])
    assert status == 408
    assert json.loads(body)["error"] == {
        "type": "timeout",
        "message": "The request body stopped arriving: 5 bytes came in 1 s, the limit "
        "(JVP_BODY_TIMEOUT_S)",
        "param": "body",
    }
    assert 0.99 <= took < 3.0  # the sweep runs every 0.1 s


def test_body_deadline_stops_counting_once_the_body_is_in() -> None:
    # Five chunks 0.05 s apart arrive within 1 s; waiting for the client to go away
    # afterwards (1.5 s) is not reading a body.
    status, body, _ = _run_with_body([b"a"] * 5, app_waits_for_disconnect=True)
    assert (status, body) == (200, b"ok")


def test_create_jvp_chunked_body_under_limit_is_served(limited: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"expression": "x * 3", '
        yield b'"primals": {"x": [1.0, 2.0]}, "tangents": {"x": [1.0, 1.0]}}'

    r = limited.post("/jvp", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["output"]["data"] == [3.0, 6.0]
    assert r.json()["jvp"]["data"] == [3.0, 3.0]


def test_live_server_rejects_bodies_over_limit_by_header_and_by_chunks() -> None:
    server = LiveServer(env={"JVP_MAX_BODY_BYTES": "2000"})
    try:
        big = b'{"expression": "x", "primals": {"x": [' + b"1.0, " * 600 + b"1.0]}}"
        headers = {"content-type": "application/json"}
        r = httpx.post(f"{server.url}/jvp", content=big, headers=headers, timeout=30)
        assert_too_large(
            r,
            f"The request body has {len(big)} bytes; the limit is 2000 bytes (JVP_MAX_BODY_BYTES)",
            "body",
        )

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 500):
                yield big[i : i + 500]

        r = httpx.post(f"{server.url}/jvp", content=chunks(), headers=headers, timeout=30)
        assert_too_large(
            r,
            "The request body passed 2000 bytes; the limit is 2000 bytes (JVP_MAX_BODY_BYTES)",
            "body",
        )
        ok = httpx.post(f"{server.url}/jvp", json=jvp("x * 2", (1.5,), [1.0]), timeout=30)
        assert ok.status_code == 200
        assert ok.json()["output"]["data"] == [3.0]
    finally:
        server.stop()


def test_create_jvp_tensor_over_element_limit_is_413(limited: TestClient) -> None:
    r = limited.post("/jvp", json=jvp(x=[1.0] * 11))
    assert_too_large(r, "Tensor 'primals.x' has 11 elements; the limit is 10", "primals.x")


def test_create_jvp_request_over_element_limit_is_413(limited: TestClient) -> None:
    body = {
        "expression": "x * y",
        "primals": {"x": [1.0] * 8, "y": [1.0] * 8},
        "tangents": {"x": [1.0] * 8},
    }
    r = limited.post("/jvp", json=body)
    assert_too_large(r, "The request holds 24 tensor elements; the limit is 20", "primals")


def test_create_jvp_tensor_over_dimension_limit_is_413(limited: TestClient) -> None:
    r = limited.post("/jvp", json=jvp(x=[[[1.0]]]))
    assert_too_large(r, "Tensor 'primals.x' has 3 dimensions; the limit is 2", "primals.x")


def test_create_jvp_expression_over_length_limit_is_413(limited: TestClient) -> None:
    expression = "x" + " + x" * 20
    r = limited.post("/jvp", json=jvp(expression))
    assert_too_large(
        r, f"Expression has {len(expression)} characters; the limit is 60", "expression"
    )


def test_create_jvp_expression_over_node_limit_is_413(limited: TestClient) -> None:
    # Three balanced groups of 7 nodes, joined by 2 more: 23 nodes, 5 deep.
    r = limited.post("/jvp", json=jvp("((x+x)+(x+x))+((x+x)+(x+x))+((x+x)+(x+x))"))
    assert_too_large(r, "Expression has 23 nodes; the limit is 20", "expression")


def test_create_jvp_expression_over_depth_limit_is_413(limited: TestClient) -> None:
    r = limited.post("/jvp", json=jvp("sin(sin(sin(sin(sin(sin(x))))))"))
    assert_too_large(r, "Expression is nested 7 levels deep; the limit is 6", "expression")


class HoldsTensors(nn.Module):
    """Records weak references to what it computes with, then runs out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[weakref.ref[torch.Tensor]] = []

    def __deepcopy__(self, memo: dict) -> HoldsTensors:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        intermediate = torch.exp(x) * 2
        self.held += [weakref.ref(x), weakref.ref(intermediate)]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_create_jvp_out_of_memory_frees_request_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    with make_client() as c:
        module = HoldsTensors()
        serve(c, "holds", module)
        service = c.app.state.runtime.services.jvp  # type: ignore[attr-defined]
        request_tensors: list[weakref.ref[torch.Tensor]] = []
        prepare = service.prepare

        def recording_prepare(request: object, *args: object) -> object:
            task = prepare(request, *args)
            request_tensors.extend(weakref.ref(t) for t in (*task.inputs, *task.tangents))
            return task

        monkeypatch.setattr(service, "prepare", recording_prepare)
        body = {"model": "holds", "primals": {"x": [[1.0, 2.0]]}, "tangents": {"x": [[1.0, 0.0]]}}
        r = c.post("/jvp", json=body)
        assert r.status_code == 507
        assert r.json()["error"]["type"] == "out_of_memory"
        assert "memory was released" in r.json()["error"]["message"]
        # What the computation held on the device (the dual input, an intermediate) is gone
        # by the time the client hears of it: no traceback or queue item keeps it.
        # (Its abstract evaluation on meta tensors ran it first: two more, gone too.)
        assert len(module.held) >= 2
        assert all(ref() is None for ref in module.held)
        # And nothing holds the request's own tensors once it was answered.
        assert len(request_tensors) == 2
        assert [ref() for ref in request_tensors] == [None, None]
        # The next request is served.
        r = c.post("/jvp", json=jvp("x * 2", (1.5,), [1.0]))
        assert r.status_code == 200
        assert r.json()["jvp"]["data"] == [2.0]
