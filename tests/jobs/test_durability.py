"""A job answered 202 is never lost: SIGKILL the service at several points, restart it on
the same database file, and every task ends with exactly one result, each right."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import LiveServer
from tests.wire import from_wire, to_wire

EXPRESSION = "sin(x) * y + x**2 / (1 + y**2)"
TASKS = 2000


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y + x**2 / (1 + y**2)


def _inputs(n: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(5)
    return [
        tuple(torch.randn(3, generator=g, dtype=torch.float64) for _ in range(4)) for _ in range(n)
    ]


def _job(server: LiveServer, job_id: str) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
    return body


def _kill(server: LiveServer) -> None:
    server.process.kill()  # SIGKILL: no shutdown, no flush
    server.process.wait()
    server.stop()


def _run_until(server: LiveServer, job_id: str, done_at_least: int) -> int:
    """Poll until `done` reaches the mark (or the job completes); returns `done`."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = _job(server, job_id)
        done = int(job["done"])  # type: ignore[call-overload]
        if done >= done_at_least or job["status"] == "completed":
            return done
        time.sleep(0.03)
    raise AssertionError(f"job {job_id} made no progress: {_job(server, job_id)}")


@pytest.mark.slow
def test_complete_job_after_sigkill_at_several_points(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    # A small in-flight window keeps progress gradual: outcomes are written in batches
    # (app/jobs/runner.py FLUSH_BATCH), and a fast run must not jump past the last mark.
    env = {"JVP_DATABASE_URL": f"sqlite:///{db}", "JVP_DEVICE": "cpu", "JVP_JOB_CONCURRENCY": "8"}
    inputs = _inputs(TASKS)
    tasks = [
        {
            "primals": {"x": to_wire(x), "y": to_wire(y)},
            "tangents": {"x": to_wire(tx), "y": to_wire(ty)},
        }
        for x, y, tx, ty in inputs
    ]
    body = {"expression": EXPRESSION, "options": {"dtype": "float64"}, "tasks": tasks}

    server = LiveServer(env=env)
    response = httpx.post(f"{server.url}/jobs", json=body, timeout=60)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["total"] == TASKS
    _kill(server)  # right after the 202

    seen = 0
    # Mid-run, and near the end: 80% leaves room for more than one written batch of
    # outcomes (FLUSH_BATCH = 256) before the job completes.
    for mark in (TASKS * 2 // 5, TASKS * 4 // 5):
        server = LiveServer(env=env)
        assert int(_job(server, job_id)["done"]) >= seen  # type: ignore[call-overload]
        seen = _run_until(server, job_id, mark)
        _kill(server)
        assert seen < TASKS, "the job finished before the kill; the test no longer kills mid-run"

    server = LiveServer(env=env)
    try:
        assert int(_job(server, job_id)["done"]) >= seen  # type: ignore[call-overload]
        _run_until(server, job_id, TASKS)
        job = _job(server, job_id)
        assert (job["status"], job["total"], job["done"], job["failed"]) == (
            "completed",
            TASKS,
            TASKS,
            0,
        )
        results: list[dict[str, object]] = []
        offset: int | None = 0
        while offset is not None:
            page = httpx.get(
                f"{server.url}/jobs/{job_id}/results",
                params={"offset": offset, "limit": 500},
                timeout=30,
            ).json()
            results += page["results"]
            offset = page["next_offset"]
    finally:
        server.stop()

    assert [r["index"] for r in results] == list(range(TASKS))  # none missing, none twice
    for r, (x, y, tx, ty) in zip(results, inputs, strict=True):
        output, jvp = torch.func.jvp(f, (x, y), (tx, ty))
        torch.testing.assert_close(from_wire(r["output"]), output, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(from_wire(r["jvp"]), jvp, rtol=1e-12, atol=1e-12)

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute(
            "SELECT status, count(*) FROM jvp_job_tasks WHERE job_id = ? GROUP BY status",
            (job_id,),
        ).fetchall()
        assert rows == [("done", TASKS)]
        dupes = conn.execute(
            "SELECT idx FROM jvp_job_tasks GROUP BY job_id, idx HAVING count(*) > 1"
        ).fetchall()
        assert dupes == []
