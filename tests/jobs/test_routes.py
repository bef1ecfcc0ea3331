"""The jobs API in-process: results against torch.func.jvp, per-task errors, route errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.jobs.store import JobStore
from app.models.builtin import BUILTINS
from tests.conftest import make_client
from tests.wire import from_wire, to_wire


@pytest.fixture
def jobs_client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(database_url=f"sqlite:///{tmp_path}/jobs.db", device="cpu") as c:
        yield c


def wait_finished(client: TestClient, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if (
            job["status"] in ("completed", "cancelled")
            and job["done"] + job["cancelled"] == job["total"]
        ):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {client.get(f'/jobs/{job_id}').json()}")


def wait_until(condition: Any, what: str, timeout_s: float = 120, poll_s: float = 0.01) -> None:
    """Poll ``condition()`` until it holds; fail saying ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        time.sleep(poll_s)


def all_results(client: TestClient, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = client.get(f"/jobs/{job_id}/results", params={"offset": offset, "limit": limit})
        assert page.status_code == 200, page.text
        out += page.json()["results"]
        offset = page.json()["next_offset"]
    return out


def assert_error(response: Any, status: int, type_: str, message: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert message in error["message"], error["message"]
    assert error["param"] == param


def test_run_job_matches_torch_jvp(jobs_client: TestClient) -> None:
    g = torch.Generator().manual_seed(0)
    points = [
        tuple(torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3)) for _ in range(30)
    ]
    body = {
        "expression": "x * tanh(y) + exp(-x**2)",
        "options": {"dtype": "float64"},
        "tasks": [
            {"primals": {"x": to_wire(x), "y": to_wire(y)}, "tangents": {"x": to_wire(v)}}
            for x, y, v in points
        ],
    }
    response = jobs_client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    created = response.json()
    assert response.headers["location"] == f"/jobs/{created['id']}"
    assert (created["total"], created["status"]) == (30, "queued")
    job = wait_finished(jobs_client, created["id"])
    assert (job["status"], job["done"], job["failed"], job["eta_s"]) == ("completed", 30, 0, 0.0)
    metrics = jobs_client.get("/metrics").text
    assert 'jvp_job_tasks_total{status="done"} 30.0' in metrics
    results = all_results(jobs_client, created["id"], limit=7)
    assert [r["index"] for r in results] == list(range(30))
    for r, (x, y, v) in zip(results, points, strict=True):
        out, jvp = torch.func.jvp(
            lambda x, y: x * torch.tanh(y) + torch.exp(-(x**2)), (x, y), (v, torch.zeros_like(y))
        )
        torch.testing.assert_close(from_wire(r["output"]), out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(from_wire(r["jvp"]), jvp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_b64_tasks_answer_as_jvp_does_at_edge_points(jobs_client: TestClient, dtype: torch.dtype):
    """A b64 task's tensors are stored as their bytes (NOTE [tensors kept as they came]):
    its output and J·v are bit for bit those of POST /jvp on the same body, and equal
    torch.func.jvp's, at 0, -0, tiny, huge and infinite points."""
    x = torch.tensor([0.0, -0.0, 1e-30, -2.5, 3e4, float("inf"), 1.0, -1e-6], dtype=dtype)
    y = torch.tensor([1.0, -1.0, 1e30, 0.5, -0.0, 2.0, float("-inf"), 7.0], dtype=dtype)
    v = torch.tensor([1.0, -2.0, 0.0, 1e-3, 1.0, 0.0, 0.0, 3.0], dtype=dtype)
    task = {
        "primals": {"x": to_wire(x, "b64"), "y": to_wire(y, "b64")},
        "tangents": {"x": to_wire(v, "b64")},
    }
    expression, options = "x * tanh(y) + sin(x)", {"dtype": str(dtype).removeprefix("torch.")}
    response = jobs_client.post(
        "/jobs", json={"expression": expression, "options": options, "tasks": [task, task]}
    )
    assert response.status_code == 202, response.text
    job = wait_finished(jobs_client, response.json()["id"])
    assert (job["done"], job["failed"]) == (2, 0)
    direct = jobs_client.post("/jvp", json={"expression": expression, "options": options, **task})
    assert direct.status_code == 200, direct.text
    out, jvp = torch.func.jvp(
        lambda x, y: x * torch.tanh(y) + torch.sin(x), (x, y), (v, torch.zeros_like(y))
    )
    for r in all_results(jobs_client, job["id"]):
        for key, reference in (("output", out), ("jvp", jvp)):
            got = from_wire(r[key])
            assert got.dtype == dtype
            same = from_wire(direct.json()[key])
            torch.testing.assert_close(got, same, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(got, reference, equal_nan=True)


def test_run_job_with_task_overrides(jobs_client: TestClient) -> None:
    linear = next(m for m in (make() for make in BUILTINS) if m.name == "linear")
    x = torch.randn(2, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    body = {
        "expression": "x**3",
        "options": {"dtype": "float64"},
        "tasks": [
            {"primals": {"x": [2.0]}, "tangents": {"x": [1.0]}},
            {"model": "linear", "primals": {"x": to_wire(x)}, "tangents": {"x": to_wire(v)}},
            {"primals": {"x": [3.0]}, "tangents": {"x": [1.0]}, "options": {"encoding": "b64"}},
        ],
    }
    job_id = jobs_client.post("/jobs", json=body).json()["id"]
    wait_finished(jobs_client, job_id)
    first, second, third = all_results(jobs_client, job_id)
    assert from_wire(first["jvp"]).tolist() == [12.0]  # d/dx x**3 = 3 x**2 at 2
    assert "b64" in third["jvp"] and from_wire(third["jvp"]).tolist() == [27.0]
    module = linear.target.materialize(torch.float64, torch.device("cpu"))
    params = {k: p.to(torch.float64) for k, p in module.parameters.items()}
    out, jvp = torch.func.jvp(lambda x: module.fn((x,), params)[0], (x,), (v,))
    torch.testing.assert_close(from_wire(second["jvp"]), jvp)
    torch.testing.assert_close(from_wire(second["output"]), out)


def test_record_task_errors_per_task(jobs_client: TestClient) -> None:
    body = {
        "expression": "x * y",
        "tasks": [
            {"primals": {"x": [1.0, 2.0], "y": [3.0, 4.0]}, "tangents": {"x": [1.0, 0.0]}},
            {"primals": {"x": [[1.0, 2.0], [3.0]], "y": [1.0]}},  # ragged: fails at submit
            {"primals": {"x": [1.0, 2.0], "y": [3.0, 4.0]}, "tangents": {"x": [1.0]}},
            {"primals": {"x": [1.0]}},  # no y
            {"primals": {"x": [1.0, 2.0], "y": [1.0, 2.0, 3.0]}},  # shapes do not broadcast
        ],
    }
    response = jobs_client.post("/jobs", json=body)
    assert response.status_code == 202
    job = wait_finished(jobs_client, response.json()["id"])
    assert (job["status"], job["done"], job["failed"]) == ("completed", 5, 4)
    ok, ragged, tangent, missing, broadcast = all_results(jobs_client, job["id"])
    assert from_wire(ok["jvp"]).tolist() == [3.0, 0.0]
    assert ragged["error"] == {
        "type": "invalid_request",
        "message": "Tensor 'primals.x' is not a rectangular nested list of numbers "
        "(rows of different lengths?)",
        "param": "primals.x",
    }
    assert tangent["error"] == {
        "type": "invalid_request",
        "message": "Expected tangent 'x' of shape [2], got [1]",
        "param": "tangents.x",
    }
    assert missing["error"]["type"] == "invalid_request"
    assert missing["error"]["message"] == "Missing primal for input 'y'; the inputs are ['x', 'y']"
    assert broadcast["error"]["type"] == "invalid_request"
    assert "The computation failed for these inputs" in broadcast["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "type_", "message", "param"),
    [
        (
            {"expression": "x +* 2", "tasks": [{"primals": {"x": 1.0}}]},
            400,
            "invalid_expression",
            "Syntax error at column 4",
            "expression",
        ),
        (
            {
                "expression": "x",
                "tasks": [
                    {"primals": {"x": 1.0}},
                    {"expression": "__import__('os')", "primals": {}},
                ],
            },
            400,
            "invalid_expression",
            "Unknown function '__import__'; allowed functions: abs",
            "tasks[1].expression",
        ),
        (
            {"model": "nope", "tasks": [{"primals": {"x": 1.0}}]},
            404,
            "not_found",
            "Unknown model 'nope'; available models:",
            "model",
        ),
        (
            {"tasks": [{"primals": {"x": 1.0}}]},
            422,
            "invalid_request",
            "Task 0 has no 'expression' or 'model', and the job gives none",
            "tasks[0].expression",
        ),
        (
            {"expression": "x", "model": "linear", "tasks": [{"primals": {"x": 1.0}}]},
            422,
            "invalid_request",
            "Give at most one of 'expression' or 'model' for the job",
            "model",
        ),
        (
            {"expression": "x", "options": {"dtype": "int8"}, "tasks": [{"primals": {"x": 1.0}}]},
            422,
            "invalid_request",
            "Unknown dtype 'int8'",
            "options.dtype",
        ),
        (
            {"expression": "x", "tasks": []},
            422,
            "invalid_request",
            "tasks: List should have at least 1 item",
            "tasks",
        ),
        (
            {"expression": "x", "tasks": [{"primal": {"x": 1.0}}]},
            422,
            "invalid_request",
            "Missing required field 'tasks.0.primals'",
            "tasks.0.primals",
        ),
    ],
)
def test_create_job_rejects_whole_job(
    jobs_client: TestClient,
    body: dict[str, Any],
    status: int,
    type_: str,
    message: str,
    param: str,
) -> None:
    before = jobs_client.get("/jobs").json()["jobs"]
    assert_error(jobs_client.post("/jobs", json=body), status, type_, message, param)
    assert jobs_client.get("/jobs").json()["jobs"] == before  # nothing stored


def test_create_job_over_task_limit_is_413(tmp_path: Path) -> None:
    with make_client(database_url=f"sqlite:///{tmp_path}/j.db", max_job_tasks=3) as c:
        body = {"expression": "x", "tasks": [{"primals": {"x": 1.0}}] * 4}
        assert_error(
            c.post("/jobs", json=body),
            413,
            "too_large",
            "The job has 4 tasks; the limit is 3 (JVP_MAX_JOB_TASKS)",
            "tasks",
        )


def test_create_job_over_body_limit_is_413(tmp_path: Path) -> None:
    with make_client(database_url=f"sqlite:///{tmp_path}/j.db", max_job_body_bytes=1000) as c:
        body = {"expression": "x", "tasks": [{"primals": {"x": [1.0] * 300}}]}
        response = c.post("/jobs", json=body)
        assert_error(
            response, 413, "too_large", "the limit is 1000 (JVP_MAX_JOB_BODY_BYTES)", "body"
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"expression": "x", "tasks": ['
            for _ in range(100):
                yield b'{"primals": {"x": 1.0}},'
            yield b'{"primals": {"x": 1.0}}]}'

        streamed = c.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert_error(
            streamed,
            413,
            "too_large",
            "more than 1000 bytes, the limit (JVP_MAX_JOB_BODY_BYTES)",
            "body",
        )


def test_create_job_with_idempotency_key_returns_same_job(jobs_client: TestClient) -> None:
    body = {"expression": "x * 2", "tasks": [{"primals": {"x": 1.0}}]}
    headers = {"Idempotency-Key": "submit-7"}
    first = jobs_client.post("/jobs", json=body, headers=headers)
    again = jobs_client.post("/jobs", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert [j["id"] for j in jobs_client.get("/jobs").json()["jobs"]] == [first.json()["id"]]
    other = {"expression": "x * 3", "tasks": [{"primals": {"x": 1.0}}]}
    assert_error(
        jobs_client.post("/jobs", json=other, headers=headers),
        422,
        "invalid_request",
        f"Idempotency-Key 'submit-7' was used for job {first.json()['id']} with a different body",
        "Idempotency-Key",
    )


def test_idempotency_key_compares_the_parsed_job_not_its_bytes(jobs_client: TestClient) -> None:
    body = {"expression": "x * 2", "tasks": [{"primals": {"x": [1.0, 2.0]}}]}
    headers = {"Idempotency-Key": "submit-8", "content-type": "application/json"}
    first = jobs_client.post("/jobs", content=json.dumps(body), headers=headers)
    assert first.status_code == 202, first.text
    # The same job: other whitespace, other key order, a default spelled out.
    respelled = (
        '{ "tasks" : [ { "options": {}, "primals" : { "x" : [ 1.0 ,\n 2.0 ] } } ] ,\n'
        '  "options": {}, "expression" : "x * 2" }'
    )
    assert json.loads(respelled) != body
    again = jobs_client.post("/jobs", content=respelled, headers=headers)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    # A different job under the same key is still refused.
    other = json.dumps({**body, "tasks": [{"primals": {"x": [1.0, 3.0]}}]})
    assert_error(
        jobs_client.post("/jobs", content=other, headers=headers),
        422,
        "invalid_request",
        f"Idempotency-Key 'submit-8' was used for job {first.json()['id']} with a different body",
        "Idempotency-Key",
    )
    wait_finished(jobs_client, first.json()["id"])
    results = jobs_client.get(f"/jobs/{first.json()['id']}/results").json()["results"]
    assert results[0]["output"]["data"] == [2.0, 4.0]


def test_list_jobs_newest_first_paged_and_filtered(jobs_client: TestClient) -> None:
    ids = [
        jobs_client.post(
            "/jobs", json={"expression": "x", "tasks": [{"primals": {"x": 1.0}}]}
        ).json()["id"]
        for _ in range(3)
    ]
    for job_id in ids:
        wait_finished(jobs_client, job_id)
    page = jobs_client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == ids[:0:-1]
    assert page["next_offset"] == 2
    rest = jobs_client.get("/jobs", params={"offset": 2, "limit": 2}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]]
    assert rest["next_offset"] is None
    completed = jobs_client.get("/jobs", params={"status": "completed"}).json()["jobs"]
    assert {j["id"] for j in completed} == set(ids)
    assert jobs_client.get("/jobs", params={"status": "queued"}).json()["jobs"] == []
    response = jobs_client.get("/jobs", params={"status": "lost"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "query.status"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/jobs/nope"), ("GET", "/jobs/nope/results"), ("DELETE", "/jobs/nope")],
)
def test_unknown_job_is_404(jobs_client: TestClient, method: str, path: str) -> None:
    assert_error(
        jobs_client.request(method, path),
        404,
        "not_found",
        "No job 'nope'; GET /jobs lists the jobs",
        "id",
    )


def test_read_results_rejects_bad_paging(jobs_client: TestClient) -> None:
    job_id = jobs_client.post(
        "/jobs", json={"expression": "x", "tasks": [{"primals": {"x": 1.0}}]}
    ).json()["id"]
    for params in ({"offset": -1}, {"limit": 0}, {"limit": 1001}):
        response = jobs_client.get(f"/jobs/{job_id}/results", params=params)
        assert response.status_code == 422, params
        assert response.json()["error"]["type"] == "invalid_request"


def test_jobs_routes_need_key_when_keys_set(tmp_path: Path) -> None:
    with make_client(database_url=f"sqlite:///{tmp_path}/j.db", api_keys=["k1"]) as c:
        for method, path in [
            ("GET", "/jobs"),
            ("POST", "/jobs"),
            ("GET", "/jobs/x"),
            ("DELETE", "/jobs/x"),
        ]:
            assert_error(c.request(method, path), 401, "unauthorized", "needs an API key", None)
        ok = c.get("/jobs", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200


def test_cancel_job_stops_tasks_not_started(jobs_client: TestClient) -> None:
    g = torch.Generator().manual_seed(1)
    points = [torch.randn(48, 48, generator=g, dtype=torch.float64) for _ in range(1500)]
    body = {
        "expression": "tanh(x @ x) @ x",
        "options": {"dtype": "float64", "encoding": "b64"},
        "tasks": [
            {"primals": {"x": to_wire(x, "b64")}, "tangents": {"x": to_wire(x, "b64")}}
            for x in points
        ],
    }
    job_id = jobs_client.post("/jobs", json=body).json()["id"]
    wait_until(
        lambda: jobs_client.get(f"/jobs/{job_id}").json()["done"] >= 20,
        "20 tasks of the job did not finish",
    )
    cancelled = jobs_client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["cancelled"] > 0
    job = wait_finished(jobs_client, job_id)
    runner = jobs_client.app.state.runtime.jobs.backend  # type: ignore[attr-defined]
    wait_until(lambda: not runner.inflight, "the runner did not settle")
    # Every task either ran (and its result is kept) or never ran; none ran after the cancel
    # without being counted: the runner computed exactly the tasks that are done.
    assert job["status"] == "cancelled"
    assert job["done"] + job["cancelled"] == 1500
    assert runner.completed == job["done"]
    assert jobs_client.get(f"/jobs/{job_id}").json() == job  # nothing moves any more
    results = all_results(jobs_client, job_id, limit=1000)
    assert [r["index"] for r in results] == list(range(1500))
    ran = [r for r in results if "output" in r]
    assert len(ran) == job["done"]
    # Tasks start in index order but need not finish in it (a tiny one may run on the event
    # loop while an earlier one waits for the device worker): the rest were cancelled.
    for r in (r for r in results if "output" not in r):
        assert r["error"] == {
            "type": "cancelled",
            "message": "The job was cancelled before this task ran",
            "param": None,
        }
    for r in ran:
        x = points[r["index"]]
        out, jvp = torch.func.jvp(lambda x: torch.tanh(x @ x) @ x, (x,), (x,))
        torch.testing.assert_close(from_wire(r["jvp"]), jvp)
    again = jobs_client.delete(f"/jobs/{job_id}")  # cancelling a finished job changes nothing
    assert again.status_code == 200 and again.json() == job


def test_run_job_on_postgresql(postgresql_url: str) -> None:
    with make_client(database_url=postgresql_url, device="cpu") as c:
        tasks = [{"primals": {"x": [float(i)]}, "tangents": {"x": [1.0]}} for i in range(40)]
        job_id = c.post(
            "/jobs", json={"expression": "x**2", "options": {"dtype": "float64"}, "tasks": tasks}
        ).json()["id"]
        job = wait_finished(c, job_id)
        assert (job["status"], job["done"], job["failed"]) == ("completed", 40, 0)
        results = all_results(c, job_id)
        assert [from_wire(r["jvp"]).item() for r in results] == [2.0 * i for i in range(40)]


def test_stop_service_leaves_unfinished_tasks_queued(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    x = torch.randn(48, 48, dtype=torch.float64)
    task = {"primals": {"x": to_wire(x, "b64")}, "tangents": {"x": to_wire(x, "b64")}}
    body = {"expression": "tanh(x @ x) @ x", "options": {"dtype": "float64"}, "tasks": [task] * 800}
    with make_client(database_url=url, device="cpu") as c:
        job_id = c.post("/jobs", json=body).json()["id"]
        wait_until(
            lambda: c.get(f"/jobs/{job_id}").json()["done"] >= 10,
            "10 tasks of the job did not finish",
        )
    # The lifespan stopped the runner: nothing is left marked running, nothing was lost.
    store = JobStore(url)
    try:
        counts = store.task_counts(job_id)
        job = store.get_job(job_id)
    finally:
        store.close()
    assert set(counts) <= {"done", "queued"}
    assert counts.get("done", 0) == job.done
    assert counts["queued"] == 800 - job.done
    assert job.status == "running"


def test_metrics_count_the_tasks_queued_and_running_now(tmp_path: Path) -> None:
    # No runner in this process: the tasks stay queued, and GET /metrics reads them from
    # the store (which every API process shares), not from what this process ran.
    url = f"sqlite:///{tmp_path}/jobs.db"
    with make_client(database_url=url, device="cpu", job_runner="off") as c:
        before = c.get("/metrics").text
        assert 'jvp_job_tasks_active{state="queued"} 0.0' in before
        tasks = [{"primals": {"x": float(i)}} for i in range(7)]
        created = c.post("/jobs", json={"expression": "x * 2", "tasks": tasks})
        assert created.status_code in (200, 201, 202), created.text
        other = c.post("/jobs", json={"expression": "x", "tasks": tasks[:2]}).json()["id"]
        text = c.get("/metrics").text
        assert 'jvp_job_tasks_active{state="queued"} 9.0' in text
        assert 'jvp_job_tasks_active{state="running"} 0.0' in text
        assert c.delete(f"/jobs/{other}").status_code == 200
        assert 'jvp_job_tasks_active{state="queued"} 7.0' in c.get("/metrics").text
