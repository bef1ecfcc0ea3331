"""Faults through HTTP: deadline 504, full queue 503 + Retry-After, device OOM 507, 501."""

from __future__ import annotations

import threading
import time

import torch
from fastapi.testclient import TestClient
from torch import nn

from app.models.registry import ModelRegistry, ServedModel, TensorSpec, module_target
from tests.conftest import make_client


class Gate(nn.Module):
    """Waits on an event before answering: lets a test hold the device worker busy."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def __deepcopy__(self, memo: dict) -> Gate:
        return self  # the served copy must share the events with the test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":  # not its abstract evaluation (app/engine/abstract.py)
            self.started.set()
            self.release.wait(10)
        return x * 2


class OutOfMemory(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Cdist(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x)


def serve(client: TestClient, name: str, module: nn.Module) -> None:
    registry: ModelRegistry = client.app.state.runtime.registry  # type: ignore[attr-defined]
    inputs = [TensorSpec("x", (-1, -1), "float32")]
    registry.add(
        ServedModel(
            name, "test", "builtin", module_target(name, module, inputs, 1), inputs, 1, [], []
        )
    )


BODY = {"primals": {"x": [[1.0, 2.0]]}, "tangents": {"x": [[1.0, 0.0]]}}


def test_create_jvp_out_of_memory_is_507_then_serves(client: TestClient) -> None:
    serve(client, "oom", OutOfMemory())
    r = client.post("/jvp", json={"model": "oom", **BODY})
    assert r.status_code == 507
    assert r.json()["error"]["type"] == "out_of_memory"
    assert (
        client.post("/jvp", json={"model": "linear", "primals": {"x": [[1.0] * 5]}}).status_code
        == 200
    )


def test_create_jvp_operator_without_forward_ad_is_501_naming_it(client: TestClient) -> None:
    serve(client, "cdist", Cdist())
    r = client.post("/jvp", json={"model": "cdist", **BODY, "options": {"fallback": "none"}})
    assert r.status_code == 501
    assert r.json()["error"]["type"] == "forward_ad_unsupported"
    assert "_cdist_forward" in r.json()["error"]["message"]


def test_create_jvp_past_deadline_is_504_then_serves() -> None:
    with make_client(request_timeout_s=0.3) as c:
        gate = Gate()
        serve(c, "gate", gate)
        started = time.monotonic()
        holder = threading.Thread(target=lambda: c.post("/jvp", json={"model": "gate", **BODY}))
        holder.start()
        gate.started.wait(10)
        r = c.post("/jvp", json={"expression": "x", "primals": {"x": 1.0}})
        assert r.status_code == 504
        assert r.json()["error"] == {
            "type": "timeout",
            "message": "The request did not finish within its deadline of 0.3 s",
            "param": None,
        }
        gate.release.set()
        holder.join(10)
        assert time.monotonic() - started < 10
        assert c.post("/jvp", json={"expression": "x", "primals": {"x": 1.0}}).status_code == 200


def test_create_jvp_full_queue_is_503_with_retry_after() -> None:
    with make_client(max_queue=1) as c:
        gate = Gate()
        serve(c, "gate", gate)
        threads = [threading.Thread(target=lambda: c.post("/jvp", json={"model": "gate", **BODY}))]
        threads[0].start()
        gate.started.wait(10)  # the worker is busy; the next request waits in the queue
        threads.append(
            threading.Thread(
                target=lambda: c.post("/jvp", json={"expression": "x", "primals": {"x": 1}})
            )
        )
        threads[1].start()
        worker = next(iter(c.app.state.runtime.engine.workers.values()))  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while worker.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/jvp", json={"expression": "x", "primals": {"x": 1.0}})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
        assert "queue is full" in r.json()["error"]["message"]
        gate.release.set()
        for t in threads:
            t.join(10)
        assert c.post("/jvp", json={"expression": "x", "primals": {"x": 1.0}}).status_code == 200
