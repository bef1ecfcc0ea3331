"""The job store on SQLite and on PostgreSQL: writes once, recovers, cancels, purges."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import inspect, update

from app.engine.errors import InvalidRequest, NotFound
from app.jobs import blobs
from app.jobs.store import JobStore, NewJob, NewTask, Outcome
from app.jobs.tables import JobRow


def _job(n: int, **kw: object) -> NewJob:
    tasks = [
        NewTask(idx=i, inputs=blobs.dump_inputs({"primals": {"x": torch.tensor([float(i)])}}))
        for i in range(n)
    ]
    return NewJob(expression="x * 2", model=None, options={"dtype": "float64"}, tasks=tasks, **kw)


def _result(value: float) -> bytes:
    t = torch.tensor([value], dtype=torch.float64)
    return blobs.dump_result((t,), (t,), single=True, method="forward")


def test_migrate_creates_tables_once(store: JobStore) -> None:
    store.migrate()  # a second run at the next start is a no-op
    tables = set(inspect(store.engine).get_table_names())
    assert {"jvp_jobs", "jvp_job_tasks", "jvp_alembic_version"} <= tables


def test_create_job_stores_tasks_queued(store: JobStore) -> None:
    job, created = store.create_job(_job(5))
    assert created
    assert (job.status, job.total, job.done, job.failed) == ("queued", 5, 0, 0)
    assert store.task_counts(job.id) == {"queued": 5}
    specs = store.claim(10)
    assert [s.idx for s in specs] == [0, 1, 2, 3, 4]
    assert blobs.load_inputs(specs[3].inputs)["primals"]["x"].tolist() == [3.0]
    assert specs[0].expression == "x * 2"
    assert specs[0].options == {"dtype": "float64"}


def test_record_writes_result_once(store: JobStore) -> None:
    job, _ = store.create_job(_job(2))
    store.claim(2)
    first = Outcome(job.id, 0, "done", result=_result(1.0))
    assert store.record([first]) == 1
    # The same task computed again (a restart re-ran it): not written, not counted again.
    again = Outcome(job.id, 0, "done", result=_result(99.0))
    assert store.record([again, again]) == 0
    view, tasks = store.results(job.id, offset=0, limit=10)
    assert (view.done, view.failed, view.status) == (1, 0, "running")
    assert [t.idx for t in tasks] == [0]
    assert blobs.load_result(tasks[0].result or b"").outputs[0].tolist() == [1.0]


def test_record_counts_errors_and_completes_job(store: JobStore) -> None:
    job, _ = store.create_job(_job(2))
    store.claim(2)
    store.record(
        [
            Outcome(job.id, 0, "done", result=_result(0.0)),
            Outcome(job.id, 1, "failed", error=("invalid_request", "bad shape", "tangents.x")),
        ]
    )
    view = store.get_job(job.id)
    assert (view.status, view.done, view.failed) == ("completed", 2, 1)
    assert view.finished_at is not None
    _, tasks = store.results(job.id, offset=0, limit=10)
    assert tasks[1].error == ("invalid_request", "bad shape", "tangents.x")


def test_recover_requeues_interrupted_tasks(store: JobStore) -> None:
    job, _ = store.create_job(_job(4))
    assert len(store.claim(3)) == 3  # then the process dies
    assert store.task_counts(job.id) == {"running": 3, "queued": 1}
    assert store.recover() == 3
    assert store.task_counts(job.id) == {"queued": 4}
    assert [s.idx for s in store.claim(10)] == [0, 1, 2, 3]


def test_cancel_ends_queued_tasks_and_keeps_results(store: JobStore) -> None:
    job, _ = store.create_job(_job(5))
    store.claim(2)
    store.record([Outcome(job.id, 0, "done", result=_result(0.0))])
    view = store.cancel(job.id)
    assert (view.status, view.done, view.cancelled) == ("cancelled", 1, 3)
    assert store.claim(10) == []  # nothing of a cancelled job runs
    # Task 1 was running when the job was cancelled: its result is still written.
    store.record([Outcome(job.id, 1, "done", result=_result(1.0))])
    _, tasks = store.results(job.id, offset=0, limit=10)
    assert [(t.idx, t.status) for t in tasks] == [
        (0, "done"),
        (1, "done"),
        (2, "cancelled"),
        (3, "cancelled"),
        (4, "cancelled"),
    ]


def test_recover_ends_tasks_of_cancelled_job(store: JobStore) -> None:
    job, _ = store.create_job(_job(3))
    store.claim(3)
    store.cancel(job.id)  # the process dies before the running tasks end
    store.recover()
    view = store.get_job(job.id)
    assert (view.done, view.cancelled) == (0, 3)
    assert store.task_counts(job.id) == {"cancelled": 3}


def test_create_job_returns_same_job_for_idempotency_key(store: JobStore) -> None:
    first, created = store.create_job(_job(2, idempotency_key="k", body_sha256="a"))
    again, created_again = store.create_job(_job(2, idempotency_key="k", body_sha256="a"))
    assert created and not created_again
    assert again.id == first.id
    assert len(store.list_jobs(offset=0, limit=10, status=None)) == 1
    with pytest.raises(InvalidRequest, match="was used for job .* with a different body"):
        store.create_job(_job(2, idempotency_key="k", body_sha256="b"))


def test_list_jobs_newest_first_with_status(store: JobStore) -> None:
    ids = [store.create_job(_job(1))[0].id for _ in range(3)]
    store.cancel(ids[1])
    assert [j.id for j in store.list_jobs(offset=0, limit=10, status=None)] == ids[::-1]
    assert [j.id for j in store.list_jobs(offset=1, limit=1, status=None)] == [ids[1]]
    assert [j.id for j in store.list_jobs(offset=0, limit=10, status="cancelled")] == [ids[1]]


def test_purge_removes_jobs_past_retention(store: JobStore) -> None:
    old, _ = store.create_job(_job(2))
    recent, _ = store.create_job(_job(2))
    active, _ = store.create_job(_job(2))
    store.cancel(old.id)
    store.cancel(recent.id)
    long_ago = store.get_job(old.id).finished_at
    assert long_ago is not None
    with store.writing() as s:
        s.execute(
            update(JobRow)
            .where(JobRow.id == old.id)
            .values(finished_at=long_ago.replace(year=long_ago.year - 1))
        )
    assert store.purge(retention_s=3600) == 1
    with pytest.raises(NotFound, match="No job"):
        store.get_job(old.id)
    assert store.task_counts(old.id) == {}
    assert store.get_job(recent.id).status == "cancelled"
    assert store.get_job(active.id).status == "queued"


def test_get_job_unknown_is_not_found(store: JobStore) -> None:
    with pytest.raises(NotFound, match="No job 'nope'; GET /jobs lists the jobs"):
        store.get_job("nope")
