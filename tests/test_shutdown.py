"""SIGTERM: the server stops taking connections, finishes the request in flight, exits 0.

The order that makes this hold: uvicorn closes its listening socket on SIGTERM,
waits for the requests in flight, and only then runs the lifespan's shutdown
(the job runner puts its unstarted tasks back in the store's queue, then the
engine stops after its queues drain).
"""

from __future__ import annotations

import base64
import signal
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer

N = 1400  # six 1400 x 1400 matrix powers: a few seconds of CPU, so the request is in flight


def b64(t: torch.Tensor) -> dict[str, object]:
    raw = t.numpy().astype("<f4").tobytes()
    return {"shape": list(t.shape), "dtype": "float32", "b64": base64.b64encode(raw).decode()}


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "jvp_http_requests_in_flight":
            return family.samples[0].value
    raise AssertionError("no jvp_http_requests_in_flight in /metrics")


def test_sigterm_finishes_request_in_flight_then_refuses_and_exits_0() -> None:
    server = LiveServer()
    try:
        # f(X) = sum(X^6) at X = I in the direction T = ones: f = N, J.T = 6 * sum(T) = 6 N^2.
        body = {
            "expression": "sum(x @ x @ x @ x @ x @ x)",
            "primals": {"x": b64(torch.eye(N))},
            "tangents": {"x": b64(torch.ones(N, N))},
        }
        answer: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{server.url}/jvp", json=body, timeout=300))
        )
        request.start()
        deadline = time.monotonic() + 60
        while in_flight(server.url) < 2:  # the /metrics request itself is one
            assert time.monotonic() < deadline, "the request never arrived"
            time.sleep(0.05)
        assert not answer, "the request finished before SIGTERM; make it slower"
        server.process.send_signal(signal.SIGTERM)

        refused = False
        while not refused and time.monotonic() < deadline + 60:
            try:
                httpx.get(f"{server.url}/healthz", timeout=5)
                time.sleep(0.05)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # Refused, or (racing the listener's close) accepted and reset unanswered.
                refused = True
        assert refused, "the server kept accepting connections after SIGTERM"

        request.join(300)
        assert len(answer) == 1
        r = answer[0]
        assert r.status_code == 200, r.text
        assert r.json()["output"]["data"] == pytest.approx([N], rel=1e-6)
        assert r.json()["jvp"]["data"] == pytest.approx([6 * N * N], rel=1e-6)
        assert server.process.wait(timeout=60) == 0, server.output()
    finally:
        server.stop()
