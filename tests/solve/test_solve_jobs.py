"""Jobs with "operation": "solve": the same answers as POST /solve, per-task errors, and a
solve too long for one request's caps run as a job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_client
from tests.jobs.test_routes import all_results, wait_finished
from tests.solve.bratu import LAMBDA, N, export, residual
from tests.solve.test_solve_http import array, wire


@pytest.fixture
def jobs_client(tmp_path: Path) -> Iterator[TestClient]:
    export(tmp_path / "models")
    with make_client(
        database_url=f"sqlite:///{tmp_path}/jobs.db",
        device="cpu",
        model_dir=tmp_path / "models",
        max_request_flops=10**8,  # the Bratu solve at its default caps is over it
    ) as c:
        yield c


def test_solve_job_matches_post_solve_and_reports_each_task(jobs_client: TestClient) -> None:
    a = [2.0, 5.0, 7.0]
    cube = {
        "expression": "u**3 - a",
        "primals": {"u": wire([1.0, 1.0, 1.0]), "a": wire(a)},
        "unknowns": ["u"],
    }
    tasks = [
        cube,
        {
            **cube,
            "method": "linear",
            "rhs": wire([1.0, 2.0, 3.0]),
            "solve_options": {"krylov": "bicgstab", "tol": 1e-12},
        },
        {**cube, "unknowns": ["q"]},  # fails alone: an unknown name
        {**cube, "solve_options": {"max_iterations": 1}},  # does not converge: still a result
    ]
    r = jobs_client.post("/jobs", json={"operation": "solve", "tasks": tasks})
    assert r.status_code == 202, r.text
    job = wait_finished(jobs_client, r.json()["id"])
    assert job["failed"] == 1 and job["done"] == 4
    results = all_results(jobs_client, job["id"])
    direct = jobs_client.post("/solve", json=cube).json()
    assert results[0]["solve"]["converged"] is True
    np.testing.assert_allclose(array(results[0]["solution"]["u"]), np.cbrt(a), atol=1e-10)
    np.testing.assert_array_equal(
        array(results[0]["solution"]["u"]), array(direct["solution"]["u"])
    )
    assert results[0]["solve"]["iterations"] == direct["iterations"]
    assert results[0]["solve"]["history"] == direct["history"]
    # linear: J = diag(3 u²) at u = 1
    np.testing.assert_allclose(array(results[1]["solution"]["u"]), [1 / 3, 2 / 3, 1.0], atol=1e-12)
    assert results[2]["error"]["param"] == "unknowns"
    assert "Unknown input 'q'" in results[2]["error"]["message"]
    assert results[3]["solve"]["converged"] is False and results[3]["solve"]["iterations"] == 1


def test_a_solve_over_the_request_limits_runs_as_a_job(jobs_client: TestClient) -> None:
    body = {
        "model": "bratu",
        "unknowns": ["u"],
        "primals": {"u": wire(np.zeros((N, N))), "lam": wire([LAMBDA])},
    }
    refused = jobs_client.post("/solve", json=body)
    assert refused.status_code == 413
    assert '"operation": "solve"' in refused.json()["error"]["message"]
    r = jobs_client.post("/jobs", json={"operation": "solve", "tasks": [body]})
    assert r.status_code == 202, r.text
    job = wait_finished(jobs_client, r.json()["id"])
    assert job["failed"] == 0
    (result,) = all_results(jobs_client, job["id"])
    assert result["solve"]["converged"] is True and result["solve"]["residual_norm"] < 1e-8
    assert np.linalg.norm(residual(array(result["solution"]["u"]))) < 1e-8


def test_a_running_solve_task_reports_its_iterations_as_progress(
    jobs_client: TestClient,
) -> None:
    # One product per Newton step (max_krylov 1): a slow solve, many iterations to watch.
    body = {
        "model": "bratu",
        "unknowns": ["u"],
        "primals": {"u": wire(np.zeros((N, N))), "lam": wire([LAMBDA])},
        "solve_options": {"max_krylov": 1, "max_iterations": 400, "line_search": False},
    }
    r = jobs_client.post("/jobs", json={"operation": "solve", "tasks": [body]})
    job_id = r.json()["id"]
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = jobs_client.get(f"/jobs/{job_id}").json()
        if job["status"] == "completed":
            break
        if "progress" in job:
            assert list(job["progress"]) == ["0"]
            seen.append(job["progress"]["0"])
        time.sleep(0.01)
    assert job["status"] == "completed" and "progress" not in job
    assert seen, "no progress was seen while the task ran"
    assert seen == sorted(seen) and all(1 <= n <= 400 for n in seen)
    (result,) = all_results(jobs_client, job_id)
    assert result["solve"]["iterations"] == 400 and result["solve"]["converged"] is False
