"""Past one machine: batch jobs computed by Celery workers on the real Redis, stored in the
real PostgreSQL, behind stateless API processes (all real subprocesses on this machine).

Workers compute on the CPU with one thread each. `JVP_CELERY_TASK_DELAY_S` (a documented
test hook, 0 in production) makes a chunk sleep after its start is committed, so a test
can kill its worker mid-chunk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import torch
from torch.func import jvp

from app.jobs import blobs
from app.jobs.celery_backend import chunks
from app.jobs.celery_config import ranges_of
from app.jobs.service import batch_key
from app.jobs.store import NewJob, NewTask
from app.jobs.tables import DONE
from tests.conftest import ROOT, free_port
from tests.scaleout.conftest import Cluster, wait_for
from tests.wire import from_wire, to_wire

EXPRESSION = "sin(x) * y + x ** 2"


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y + x**2


def make_tasks(n: int, seed: int, sizes: tuple[int, ...] = (6,)) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = sizes[i % len(sizes)]
        out.append({k: torch.randn(size, generator=g) for k in ("x", "y", "tx", "ty")})
    return out


def body(tasks: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    return {
        "expression": EXPRESSION,
        "options": {"encoding": "b64"},
        "tasks": [
            {
                "primals": {"x": to_wire(t["x"], "b64"), "y": to_wire(t["y"], "b64")},
                "tangents": {"x": to_wire(t["tx"], "b64"), "y": to_wire(t["ty"], "b64")},
            }
            for t in tasks
        ],
    }


def submit(api_url: str, tasks: list[dict[str, torch.Tensor]]) -> str:
    r = httpx.post(f"{api_url}/jobs", json=body(tasks), timeout=30)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def wait_completed(api_url: str, job_id: str, timeout_s: float) -> dict[str, Any]:
    def completed() -> dict[str, Any] | None:
        job: dict[str, Any] = httpx.get(f"{api_url}/jobs/{job_id}", timeout=10).json()
        return job if job["status"] == "completed" else None

    job = wait_for(completed, timeout_s, f"job {job_id} to complete")
    assert isinstance(job, dict)
    return job


def check_results(api_url: str, job_id: str, tasks: list[dict[str, torch.Tensor]]) -> None:
    """Every task's output and JVP equal torch.func.jvp's."""
    r = httpx.get(f"{api_url}/jobs/{job_id}/results", params={"limit": 1000}, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["index"] for res in results] == list(range(len(tasks)))
    for res, t in zip(results, tasks, strict=True):
        assert "error" not in res or res["error"] is None, res
        want_out, want_jvp = jvp(f, (t["x"], t["y"]), (t["tx"], t["ty"]))
        torch.testing.assert_close(from_wire(res["output"]), want_out)
        torch.testing.assert_close(from_wire(res["jvp"]), want_jvp)


def pid_of(worker_id: str | None) -> int:
    assert worker_id is not None
    return int(worker_id.rsplit(":", 1)[1])


# -- pure parts ------------------------------------------------------------------------------


def test_chunk_tasks_by_batch_key_in_task_order() -> None:
    plan = [(0, "a"), (1, "b"), (2, "a"), (3, "a"), (4, "b"), (5, "a"), (7, None)]
    assert chunks(plan, 2) == [[0, 2], [1, 4], [3, 5], [7]]
    assert ranges_of([0, 1, 2, 5, 7, 8]) == [[0, 3], [5, 6], [7, 9]]


def test_batch_key_separates_shapes_functions_and_options() -> None:
    def inputs(n: int, dtype: torch.dtype = torch.float32) -> bytes:
        return blobs.dump_inputs({"primals": {"x": torch.zeros(n, dtype=dtype)}})

    key = batch_key("x**2", None, {"dtype": "float32"}, inputs(3))
    assert key == batch_key(
        "x**2", None, {"dtype": "float32"}, blobs.dump_inputs({"primals": {"x": torch.ones(3)}})
    )  # other numbers, same shapes: one batch
    assert key != batch_key("x**2", None, {"dtype": "float32"}, inputs(4))
    assert key != batch_key("x**3", None, {"dtype": "float32"}, inputs(3))
    assert key != batch_key("x**2", None, {"dtype": "float64"}, inputs(3, torch.float64))
    assert key != batch_key(None, "x**2", {"dtype": "float32"}, inputs(3))


# -- real workers --------------------------------------------------------------------------


def test_compute_job_with_two_worker_processes(cluster: Cluster) -> None:
    workers = [cluster.worker(JVP_CELERY_TASK_DELAY_S="0.3") for _ in range(2)]
    api = cluster.api(JVP_CELERY_CHUNK_SIZE="2")
    for w in workers:
        w.wait_ready()
    tasks = make_tasks(16, seed=1, sizes=(6, 3))  # two shapes, interleaved
    job_id = submit(api.url, tasks)

    job = wait_completed(api.url, job_id, 60)

    assert (job["total"], job["done"], job["failed"]) == (16, 16, 0)
    check_results(api.url, job_id, tasks)
    rows = cluster.tasks(job_id)
    children = [w.children() for w in workers]
    by_worker = [{i for i, r in rows.items() if pid_of(r.worker) in c} for c in children]
    assert all(by_worker), f"each worker computed some tasks: {by_worker}"
    assert by_worker[0] | by_worker[1] == set(range(16))
    assert {r.attempts for r in rows.values()} == {1}  # each computed once
    # Chunks hold tasks of one shape: the worker logs name the index ranges it computed.
    logs = "".join(w.output() for w in workers)
    assert f"computed 2 task(s) of job {job_id} [[0, 1], [2, 3]]" in logs


def test_redeliver_chunk_of_sigkilled_worker_and_compute_it_once(cluster: Cluster) -> None:
    workers = [cluster.worker(JVP_CELERY_TASK_DELAY_S="2") for _ in range(2)]
    api = cluster.api(JVP_CELERY_CHUNK_SIZE="1")
    for w in workers:
        w.wait_ready()
    tasks = make_tasks(3, seed=2)
    job_id = submit(api.url, tasks)

    def running() -> tuple[int, int] | None:
        for idx, row in cluster.tasks(job_id).items():
            if row.status == "running":
                return idx, pid_of(row.worker)
        return None

    started = wait_for(running, 30, "a task to start")
    assert isinstance(started, tuple)
    killed_idx, killed_pid = started
    victim = next(w for w in workers if killed_pid in w.children())
    survivor = next(w for w in workers if w is not victim)
    victim.kill()  # parent and child, mid-chunk: only the visibility timeout brings it back

    job = wait_completed(api.url, job_id, 60)

    assert (job["total"], job["done"], job["failed"]) == (3, 3, 0)
    check_results(api.url, job_id, tasks)
    rows = cluster.tasks(job_id)
    assert cluster.store.task_counts(job_id) == {DONE: 3}
    assert rows[killed_idx].attempts == 2  # the killed start, then the one that finished
    assert pid_of(rows[killed_idx].worker) in survivor.children()
    assert all(r.attempts == 1 for i, r in rows.items() if i != killed_idx)


def test_fail_task_that_keeps_killing_its_worker(cluster: Cluster) -> None:
    worker = cluster.worker(JVP_CELERY_TASK_DELAY_S="3", JVP_MAX_TASK_ATTEMPTS="2")
    api = cluster.api()
    worker.wait_ready()
    tasks = make_tasks(1, seed=3)
    job_id = submit(api.url, tasks)

    for attempt in (1, 2):

        def started(attempt: int = attempt) -> int | None:
            row = cluster.tasks(job_id)[0]
            ok = row.status == "running" and row.attempts == attempt
            return pid_of(row.worker) if ok else None

        child = wait_for(started, 60, f"attempt {attempt} to start")
        assert isinstance(child, int)
        os.kill(child, signal.SIGKILL)  # the pool child dies; its parent requeues the chunk

    job = wait_completed(api.url, job_id, 60)

    assert (job["total"], job["done"], job["failed"]) == (1, 1, 1)
    r = httpx.get(f"{api.url}/jobs/{job_id}/results", timeout=10).json()
    error = r["results"][0]["error"]
    assert error["type"] == "internal_error"
    assert error["message"].startswith("Worker lost 2 times while computing this task")
    assert "JVP_MAX_TASK_ATTEMPTS=2" in error["message"]
    assert cluster.tasks(job_id)[0].attempts == 2  # not started a third time


def test_finish_jobs_when_api_is_killed_and_restarted_mid_job(cluster: Cluster) -> None:
    worker = cluster.worker(JVP_CELERY_TASK_DELAY_S="0.5")
    first = cluster.api(JVP_CELERY_CHUNK_SIZE="1")
    worker.wait_ready()
    tasks = make_tasks(6, seed=4)
    job_id = submit(first.url, tasks)
    wait_for(lambda: cluster.store.get_job(job_id).done >= 1, 30, "the first result")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    # A job an API process stored and died before sending to the broker.
    orphan_tasks = make_tasks(3, seed=5)
    orphan = NewJob(expression=EXPRESSION, model=None, options={"encoding": "b64"}, tasks=[])
    for i, t in enumerate(orphan_tasks):
        inputs = blobs.dump_inputs(
            {"primals": {"x": t["x"], "y": t["y"]}, "tangents": {"x": t["tx"], "y": t["ty"]}}
        )
        key = batch_key(EXPRESSION, None, {"encoding": "b64"}, inputs)
        orphan.tasks.append(NewTask(idx=i, inputs=inputs, batch_key=key))
    cluster.store.create_job(orphan)

    second = cluster.api(JVP_CELERY_CHUNK_SIZE="1")

    job = wait_completed(second.url, job_id, 60)
    assert (job["total"], job["done"], job["failed"]) == (6, 6, 0)
    check_results(second.url, job_id, tasks)
    job = wait_completed(second.url, orphan.id, 60)
    assert (job["total"], job["done"], job["failed"]) == (3, 3, 0)
    check_results(second.url, orphan.id, orphan_tasks)
    assert {r.attempts for r in cluster.tasks(job_id).values()} == {1}


def test_serve_jvp_from_two_api_processes(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "api.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"],
        cwd=ROOT,
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
            if server.poll() is not None:
                raise RuntimeError((tmp_path / "api.log").read_text())
            try:
                up = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
            spawned = [
                pid
                for pid in children.read_text().split()
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            return up and len(spawned) == 2  # (the third child is multiprocessing's tracker)

        wait_for(ready, 60, "two API processes")
        with httpx.Client(timeout=30) as client:
            for seed in range(8):
                x, tx = torch.randn(5, generator=torch.Generator().manual_seed(seed)), torch.ones(5)
                r = client.post(
                    f"{url}/jvp",
                    json={
                        "expression": "sin(x) * x",
                        "primals": {"x": to_wire(x, "b64")},
                        "tangents": {"x": to_wire(tx, "b64")},
                    },
                )
                assert r.status_code == 200, r.text
                want = jvp(lambda x: torch.sin(x) * x, (x,), (tx,))[1]
                torch.testing.assert_close(from_wire(r.json()["jvp"]), want)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
