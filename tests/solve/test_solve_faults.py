"""/solve under the faults /jvp is tested under (tests/test_faults.py): a full queue is a
503 with Retry-After, a device out of memory a 507, and the service serves on after each."""

from __future__ import annotations

import threading
import time

import httpx
from fastapi.testclient import TestClient

from tests.conftest import make_client
from tests.test_faults import BODY, Gate, OutOfMemory, serve

SOLVE = {"expression": "u**3 - a", "primals": {"u": [1.0, 1.0], "a": [8.0, 27.0]}}


def solve(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/solve", json={"unknowns": ["u"], **SOLVE, **body})


def test_solve_on_a_full_queue_is_503_with_retry_after_then_serves() -> None:
    with make_client(max_queue=1) as c:
        gate = Gate()
        serve(c, "gate", gate)
        hold = threading.Thread(target=lambda: c.post("/jvp", json={"model": "gate", **BODY}))
        hold.start()
        gate.started.wait(10)  # the worker is busy; the next request waits in the queue
        queued = threading.Thread(target=lambda: solve(c))
        queued.start()
        worker = next(iter(c.app.state.runtime.engine.workers.values()))  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while worker.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = solve(c)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
        assert "queue is full" in r.json()["error"]["message"]
        gate.release.set()
        hold.join(10)
        queued.join(10)
        r = solve(c)
        assert r.status_code == 200, r.text
        assert r.json()["converged"] is True


def test_solve_of_a_model_out_of_device_memory_is_507_then_serves(client: TestClient) -> None:
    serve(client, "oom", OutOfMemory())
    r = client.post(
        "/solve", json={"model": "oom", "primals": {"x": [[1.0, 2.0]]}, "unknowns": ["x"]}
    )
    assert r.status_code == 507, r.text
    assert r.json()["error"]["type"] == "out_of_memory"
    r = solve(client)
    assert r.status_code == 200, r.text
    assert r.json()["converged"] is True
