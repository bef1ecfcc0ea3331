"""NOTE [finished-job events]: a job's end wakes its waiters, in this process and, through
PostgreSQL's NOTIFY, in another; GET /jobs/{id}?wait_s= answers at the end or at wait_s."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.jobs import blobs
from app.jobs.events import JobEvents
from app.jobs.service import JobService
from app.jobs.store import JobStore, NewJob, NewTask, Outcome
from tests.conftest import make_client
from tests.jobs.test_routes import assert_error, from_wire


def _job(n: int) -> NewJob:
    tasks = [
        NewTask(idx=i, inputs=blobs.dump_inputs({"primals": {"x": torch.tensor([float(i)])}}))
        for i in range(n)
    ]
    return NewJob(expression="x * 2", model=None, options={"dtype": "float64"}, tasks=tasks)


def _done(job_id: str, idx: int) -> Outcome:
    t = torch.tensor([2.0 * idx], dtype=torch.float64)
    return Outcome(
        job_id, idx, "done", result=blobs.dump_result((t,), (t,), single=True, method="forward")
    )


def heard(events: JobEvents, job_id: str) -> threading.Event:
    woken = threading.Event()
    events.subscribe(job_id, woken.set)
    return woken


def test_the_last_outcome_of_a_job_wakes_its_waiters_in_this_process(store: JobStore) -> None:
    job, _ = store.create_job(_job(2))
    other, _ = store.create_job(_job(1))
    woken, other_woken = heard(store.events, job.id), heard(store.events, other.id)
    store.claim(3)
    store.record([_done(job.id, 0)])
    assert not woken.is_set()  # one task of two: not finished
    store.record([_done(job.id, 1)])
    assert woken.is_set() and not other_woken.is_set()
    assert store.get_job(job.id).status == "completed"


def test_a_cancel_wakes_the_waiters(store: JobStore) -> None:
    job, _ = store.create_job(_job(3))
    woken = heard(store.events, job.id)
    store.cancel(job.id)
    assert woken.is_set()


def test_a_job_finished_by_another_process_wakes_a_listening_one(postgresql_url: str) -> None:
    """The API's store LISTENs; the worker's store (another connection pool, as another
    process has) writes the last outcome: PostgreSQL's NOTIFY wakes the API's waiter."""
    api, worker = JobStore(postgresql_url), JobStore(postgresql_url)
    try:
        api.migrate()
        api.listen()
        assert api._listener is not None and api._listener.listening.wait(10)
        job, _ = api.create_job(_job(1))
        cancelled, _ = api.create_job(_job(1))
        woken, cancel_heard = heard(api.events, job.id), heard(api.events, cancelled.id)
        worker.claim(1, skip_jobs=[cancelled.id])
        worker.record([_done(job.id, 0)])
        assert woken.wait(10), "the API's store heard nothing of the job the worker finished"
        worker.cancel(cancelled.id)
        assert cancel_heard.wait(10), "the API's store heard nothing of the cancel"
    finally:
        api.close()
        worker.close()


def test_without_word_a_wait_still_ends_when_the_job_does(postgresql_url: str) -> None:
    """A store that does not listen (its listener lost the database) misses the NOTIFY:
    the waiter reads the job again every RECHECK_S and still answers at the end."""
    api, worker = JobStore(postgresql_url), JobStore(postgresql_url)
    try:
        api.migrate()
        job, _ = api.create_job(_job(1))
        service = JobService(None, api, None)  # type: ignore[arg-type]  # only `job` is used

        def finish() -> None:
            time.sleep(0.3)
            worker.claim(1)
            worker.record([_done(job.id, 0)])

        threading.Thread(target=finish).start()
        t0 = time.monotonic()
        view = asyncio.run(service.job(job.id, wait_s=30))
        assert view.status == "completed" and view.done == 1
        assert time.monotonic() - t0 < 20  # ended by the recheck, not by wait_s
    finally:
        api.close()
        worker.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(database_url=f"sqlite:///{tmp_path}/jobs.db", device="cpu") as c:
        yield c


def test_get_job_with_wait_s_answers_when_the_job_has_finished(client: TestClient) -> None:
    x = torch.linspace(-3, 3, 50, dtype=torch.float64)
    tasks = [{"primals": {"x": x.tolist()}, "tangents": {"x": [1.0] * 50}}] * 20
    body = {"expression": "sin(x) * x", "options": {"dtype": "float64"}, "tasks": tasks}
    job_id = client.post("/jobs", json=body).json()["id"]
    t0 = time.monotonic()
    job = client.get(f"/jobs/{job_id}", params={"wait_s": 60}).json()
    assert time.monotonic() - t0 < 30  # at the job's end, long before wait_s
    assert (job["status"], job["done"], job["failed"]) == ("completed", 20, 0)
    results = client.get(f"/jobs/{job_id}/results").json()["results"]
    expected = torch.cos(x) * x + torch.sin(x)
    for r in results:
        torch.testing.assert_close(from_wire(r["jvp"]), expected)


def test_get_job_with_wait_s_answers_at_wait_s_with_the_state_then(tmp_path: Path) -> None:
    with make_client(
        database_url=f"sqlite:///{tmp_path}/jobs.db", device="cpu", job_runner="off"
    ) as c:
        tasks = [{"primals": {"x": [1.0]}, "tangents": {"x": [1.0]}}]
        job_id = c.post("/jobs", json={"expression": "x * 2", "tasks": tasks}).json()["id"]
        t0 = time.monotonic()
        job = c.get(f"/jobs/{job_id}", params={"wait_s": 0.5}).json()
        assert time.monotonic() - t0 >= 0.5
        assert (job["status"], job["done"]) == ("queued", 0)  # no runner: it never starts


@pytest.mark.parametrize(
    ("wait_s", "expected"),
    [("-1", "greater than or equal to 0"), ("61", "less than or equal to 60"), ("soon", "number")],
)
def test_get_job_with_a_bad_wait_s_is_422(client: TestClient, wait_s: str, expected: str) -> None:
    tasks = [{"primals": {"x": [1.0]}, "tangents": {"x": [1.0]}}]
    job_id = client.post("/jobs", json={"expression": "x * 2", "tasks": tasks}).json()["id"]
    assert_error(
        client.get(f"/jobs/{job_id}", params={"wait_s": wait_s}),
        422,
        "invalid_request",
        f"query.wait_s: Input should be {'a valid ' if wait_s == 'soon' else ''}{expected}",
        "query.wait_s",
    )


def test_get_job_with_wait_s_of_an_unknown_job_is_404(client: TestClient) -> None:
    assert_error(client.get("/jobs/nope", params={"wait_s": 5}), 404, "not_found", "No job", "id")
