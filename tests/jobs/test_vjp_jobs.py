"""Jobs with "operation": "vjp": results against torch.func.vjp, per-task errors, and a
job that mixes jvp and vjp tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch.func import jvp, vjp

from tests.conftest import make_client
from tests.jobs.test_routes import all_results, wait_finished
from tests.wire import from_wire, to_wire


@pytest.fixture
def jobs_client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(database_url=f"sqlite:///{tmp_path}/jobs.db", device="cpu") as c:
        yield c


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y


def test_run_vjp_job_matches_torch_func_vjp(jobs_client: TestClient) -> None:
    g = torch.Generator().manual_seed(5)
    points = [
        tuple(torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3)) for _ in range(3)
    ]
    tasks = [
        {"primals": {"x": to_wire(x), "y": to_wire(y)}, "cotangents": to_wire(u)}
        for x, y, u in points
    ]
    tasks[1]["wrt"] = ["y"]
    # A jvp task in the same job, and a vjp task whose cotangent has the wrong shape.
    x0, y0, u0 = points[0]
    tasks.append(
        {"operation": "jvp", "primals": {"x": to_wire(x0), "y": to_wire(y0)},
         "tangents": {"x": to_wire(u0)}}
    )  # fmt: skip
    tasks.append({"primals": {"x": to_wire(x0), "y": to_wire(y0)}, "cotangents": [1.0]})
    r = jobs_client.post(
        "/jobs",
        json={
            "expression": "sin(x) * y",
            "operation": "vjp",
            "options": {"dtype": "float64"},
            "tasks": tasks,
        },
    )
    assert r.status_code == 202, r.text
    job = wait_finished(jobs_client, r.json()["id"])
    assert job["failed"] == 1
    results = all_results(jobs_client, job["id"])
    for i, (x, y, u) in enumerate(points):
        _, fn = vjp(f, x, y)
        gx, gy = fn(u)
        got = results[i]["vjp"]
        if i == 1:
            assert list(got) == ["y"]
        else:
            torch.testing.assert_close(from_wire(got["x"]), gx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(from_wire(got["y"]), gy, rtol=1e-12, atol=1e-12)
    _, ref = jvp(lambda a: f(a, y0), (x0,), (u0,))
    torch.testing.assert_close(from_wire(results[3]["jvp"]), ref, rtol=1e-12, atol=1e-12)
    error = results[4]["error"]
    assert error["type"] == "invalid_request"
    assert "Expected cotangent of shape [4]" in error["message"]
