"""Jobs of ``"operation": "solve"`` tasks computed by a real `jvp-service worker` (Celery on
the real RabbitMQ, the store in the real PostgreSQL), behind a real API process: each
solution against an independent reference, and the job's ``done``/``progress`` fields as
README "Batch jobs" documents them (``done`` counts tasks; ``progress`` the Newton
iterations of the running solve tasks, which a Celery worker writes to the store).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch.func import jacfwd

from tests.scaleout.conftest import Cluster, wait_for
from tests.scaleout.test_celery import wait_completed

LINEAR = "A @ tanh(u) + b * u"  # J = A diag(1 - tanh(u)²) + diag(b): a full matrix


def wire(values: Any) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"shape": list(a.shape), "dtype": "float64", "data": a.reshape(-1).tolist()}


def array(tensor: dict[str, Any]) -> np.ndarray:
    assert tensor["dtype"] == "float64", tensor["dtype"]  # a solve task's default dtype
    return np.asarray(tensor["data"], dtype=np.float64).reshape(tensor["shape"])


def linear_reference(A: np.ndarray, b: np.ndarray, u: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """δ with J(u) δ = rhs: J from torch.func.jacfwd here, solved by numpy.linalg.solve."""

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(A) @ torch.tanh(u) + torch.from_numpy(b) * u

    J = jacfwd(f)(torch.from_numpy(u)).numpy()
    return np.linalg.solve(J, rhs)


def results_of(api_url: str, job_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{api_url}/jobs/{job_id}/results", params={"limit": 100}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["next_offset"] is None
    results: list[dict[str, Any]] = body["results"]
    return results


def watch(api_url: str, job_id: str, timeout_s: float) -> list[dict[str, Any]]:
    """The job as GET /jobs/{id} shows it, polled until it completes."""
    seen: list[dict[str, Any]] = []

    def completed() -> bool:
        seen.append(httpx.get(f"{api_url}/jobs/{job_id}", timeout=10).json())
        return bool(seen[-1]["status"] == "completed")

    wait_for(completed, timeout_s, f"job {job_id} to complete")
    return seen


def test_compute_solve_tasks_on_a_celery_worker(cluster: Cluster) -> None:
    # The delay holds each chunk "running" for a moment after its start is committed, so
    # the job is seen while a worker computes it.
    worker = cluster.worker(JVP_CELERY_TASK_DELAY_S="1")
    api = cluster.api(JVP_CELERY_CHUNK_SIZE="2")
    worker.wait_ready()
    g = np.random.default_rng(18)
    cubes = [g.uniform(0.5, 30.0, size=5) for _ in range(2)]
    n = 4
    A, b = g.standard_normal((n, n)), g.uniform(1.0, 2.0, size=n)
    u0, rhs = g.standard_normal(n), g.standard_normal(n)

    def cube(a: np.ndarray) -> dict[str, Any]:
        return {
            "expression": "u**3 - a",
            "primals": {"u": wire(np.ones(5)), "a": wire(a)},
            "unknowns": ["u"],
            "solve_options": {"tol": 1e-12},
        }

    tasks = [
        cube(cubes[0]),  # these two have one batch key: one chunk, one engine submit
        cube(cubes[1]),
        {
            "expression": LINEAR,
            "primals": {"A": wire(A), "b": wire(b), "u": wire(u0)},
            "unknowns": ["u"],
            "method": "linear",
            "rhs": wire(rhs),
            "solve_options": {"krylov": "gmres", "tol": 1e-13},
        },
        {**cube(cubes[0]), "unknowns": ["q"]},  # this task's own error; the job goes on
    ]
    r = httpx.post(f"{api.url}/jobs", json={"operation": "solve", "tasks": tasks}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["total"] == 4

    seen = watch(api.url, job_id, 60)  # every state GET /jobs/{id} showed, to completion
    job = seen[-1]

    assert (job["total"], job["done"], job["failed"]) == (4, 4, 1)
    # done counts tasks (never Newton iterations): monotone, within the total. These
    # solves take milliseconds, so the worker rarely has a count to report; any it did
    # report names a solve task that was running (test below: a long one).
    dones = [j["done"] for j in seen]
    assert dones == sorted(dones) and all(0 <= d <= 4 for d in dones)
    for j in seen:
        assert set(j.get("progress", {})) <= {"0", "1", "2", "3"}, j
        assert all(n >= 1 for n in j.get("progress", {}).values()), j
    running = [j for j in seen if j["status"] == "running"]
    assert running, "the job was never seen running"
    assert all(j["done"] < 4 for j in running)
    # Three chunks ([0, 1], [2], [3]: one batch key each), a second apart: tasks ended
    # while others were still to run.
    assert any(0 < j["done"] < 4 for j in running), dones

    results = results_of(api.url, job_id)
    assert [res["index"] for res in results] == [0, 1, 2, 3]
    for res, a in zip(results[:2], cubes, strict=True):
        assert "error" not in res, res
        report = res["solve"]
        assert report["converged"] is True and report["residual_norm"] <= 1e-12
        assert report["iterations"] == len(report["history"]) >= 1
        assert report["jvp_count"] >= report["iterations"] and report["vjp_count"] == 0
        np.testing.assert_allclose(array(res["solution"]["u"]), a ** (1 / 3), rtol=1e-12)
        np.testing.assert_allclose(array(res["output"]), 0.0, atol=1e-12)
    linear = results[2]
    assert "error" not in linear, linear
    assert linear["solve"]["converged"] is True
    np.testing.assert_allclose(
        array(linear["solution"]["u"]), linear_reference(A, b, u0, rhs), rtol=1e-9, atol=1e-12
    )
    assert results[3]["error"]["param"] == "unknowns"
    assert "Unknown input 'q'" in results[3]["error"]["message"]
    # Computed on the worker, each once: its pool child's pid is on every computed row.
    rows = cluster.tasks(job_id)
    children = worker.children()
    assert all(int(str(rows[i].worker).rsplit(":", 1)[1]) in children for i in range(4))
    assert {rows[i].attempts for i in range(4)} == {1}


def test_solve_task_that_does_not_converge_on_a_celery_worker(cluster: Cluster) -> None:
    # Not converging is a result, not an error; a solve too long for one request (its caps
    # times one product over JVP_MAX_REQUEST_FLOPS) still runs as a task: a task is bounded
    # by one product, not by the caps.
    worker = cluster.worker(JVP_MAX_REQUEST_FLOPS="100000")
    api = cluster.api(JVP_MAX_REQUEST_FLOPS="100000")
    worker.wait_ready()
    a = np.arange(1.0, 9.0)
    body = {
        "expression": "u**3 - a",
        "primals": {"u": wire(np.ones(8)), "a": wire(a)},
        "unknowns": ["u"],
    }
    capped = {**body, "options": {"max_iterations": 10_000, "max_krylov": 100_000}}
    refused = httpx.post(f"{api.url}/solve", json=capped, timeout=30)
    assert refused.status_code == 413, refused.text
    assert '"operation": "solve"' in refused.json()["error"]["message"]
    tasks = [
        {**body, "solve_options": {"max_iterations": 2, "line_search": False}},
        {**body, "solve_options": {"max_iterations": 10_000, "max_krylov": 100_000}},
    ]
    r = httpx.post(f"{api.url}/jobs", json={"operation": "solve", "tasks": tasks}, timeout=30)
    assert r.status_code == 202, r.text

    job = wait_completed(api.url, r.json()["id"], 60)

    assert (job["total"], job["done"], job["failed"]) == (2, 2, 0)
    stopped, solved = results_of(api.url, job["id"])
    assert stopped["solve"]["converged"] is False
    assert stopped["solve"]["iterations"] == 2 == len(stopped["solve"]["history"])
    assert stopped["solve"]["residual_norm"] > 1e-8
    assert solved["solve"]["converged"] is True
    np.testing.assert_allclose(array(solved["solution"]["u"]), np.cbrt(a), rtol=1e-10)


def test_a_long_solve_on_a_celery_worker_reports_its_newton_iterations(cluster: Cluster) -> None:
    """NOTE [progress across processes]: the worker's count reaches GET /jobs/{id} of an API
    process through the store, about once a second, while the task runs."""
    worker = cluster.worker()
    api = cluster.api()
    worker.wait_ready()
    n = 200_000  # exp(u) from u = 0 to ||exp(u)|| <= 1e-300: 697 Newton steps, seconds
    u0 = {"shape": [n], "dtype": "float64", "b64": base64.b64encode(np.zeros(n).data).decode()}
    task = {
        "expression": "exp(u)",
        "primals": {"u": u0},
        "unknowns": ["u"],
        "options": {"encoding": "b64"},
        "solve_options": {"tol": 1e-300, "max_iterations": 2000},
    }
    r = httpx.post(f"{api.url}/jobs", json={"operation": "solve", "tasks": [task]}, timeout=60)
    assert r.status_code == 202, r.text
    seen = watch(api.url, r.json()["id"], 180)

    counts = [j["progress"]["0"] for j in seen if "progress" in j]
    assert counts, "GET /jobs/{id} never showed the running solve's progress"
    assert counts == sorted(counts) and counts[0] >= 1
    assert len(set(counts)) >= 2, counts  # it moved while the solve ran
    assert all(j["status"] == "running" for j in seen if "progress" in j)
    assert "progress" not in seen[-1]  # completed: nothing is running
    (result,) = results_of(api.url, r.json()["id"])
    report = result["solve"]
    # Each Newton step of exp is exactly -1: the first k with sqrt(n) e^-k <= tol.
    k = math.ceil(300 * math.log(10) + 0.5 * math.log(n))
    assert report["converged"] is True and report["iterations"] == k >= counts[-1]
    f = np.frombuffer(base64.b64decode(result["output"]["b64"]), dtype=np.float64)
    biggest = float(f.max())
    true_norm = biggest * math.sqrt(float(np.sum((f / biggest) ** 2)))  # scaled: no underflow
    assert 0 < true_norm <= 1e-300
    assert report["residual_norm"] == pytest.approx(true_norm, rel=1e-12)
