"""Tiny tasks claimed together compute as one stacked JVP (`Engine.run_together`): each
task still gets its own numbers, its own shape and its own error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine import engine as engine_module
from tests.conftest import make_client
from tests.jobs.test_routes import all_results, wait_finished
from tests.wire import from_wire, to_wire


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y + x**2


@pytest.fixture
def jobs_client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(database_url=f"sqlite:///{tmp_path}/jobs.db", device="cpu") as c:
        yield c


def test_stacked_tasks_each_get_their_own_numbers_shapes_and_errors(
    jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    stacked: list[int] = []
    run_together = engine_module.Engine.run_together

    def counted(self: engine_module.Engine, tasks: list) -> list | None:  # type: ignore[type-arg]
        results = run_together(self, tasks)
        if results is not None:
            stacked.append(len(tasks))
        return results

    monkeypatch.setattr(engine_module.Engine, "run_together", counted)
    g = torch.Generator().manual_seed(5)
    edges = [0.0, -0.0, 1e-300, -1e-300, 1e150, -1e150, 3.0, -2.5]
    points = []
    for i in range(40):
        n = (8, 3)[i % 4 == 3]  # runs of one shape, then another: two works in a row
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if n == 8:
            x = torch.tensor(edges, dtype=torch.float64)
        x = x.roll(i)
        y = torch.randn(n, generator=g, dtype=torch.float64)
        v = torch.randn(n, generator=g, dtype=torch.float64)
        points.append((x, y, v))
    tasks = [
        {"primals": {"x": to_wire(x), "y": to_wire(y)}, "tangents": {"x": to_wire(v)}}
        for x, y, v in points
    ]
    tasks[17] = {"primals": {"x": to_wire(points[17][0])}, "tangents": {}}  # y missing
    body = {"expression": "sin(x) * y + x**2", "options": {"dtype": "float64"}, "tasks": tasks}
    response = jobs_client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_finished(jobs_client, response.json()["id"])
    assert (job["done"], job["failed"]) == (40, 1)
    assert stacked and max(stacked) > 1, "no tasks were computed together"
    results = all_results(jobs_client, response.json()["id"])
    for i, (r, (x, y, v)) in enumerate(zip(results, points, strict=True)):
        if i == 17:
            assert r["error"]["type"] == "invalid_request" and "'y'" in r["error"]["message"]
            continue
        out, jvp = torch.func.jvp(lambda a, y=y: f(a, y), (x,), (v,))
        got_out, got_jvp = from_wire(r["output"]), from_wire(r["jvp"])
        assert got_out.shape == x.shape and got_jvp.shape == x.shape
        torch.testing.assert_close(got_out, out, rtol=1e-13, atol=0)
        torch.testing.assert_close(got_jvp, jvp, rtol=1e-13, atol=0)
