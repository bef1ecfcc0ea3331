"""A worker or an API process that disappears mid-job, with the default timeouts: the job
completes within 60 s of the loss, every result equal to torch.func.jvp's and written once
(NOTE [task leases] in app/jobs/leases.py).

"Written once" is counted by PostgreSQL itself: a trigger in the test's schema logs every
update that ends a task, so a task whose result was written twice shows up twice.
"""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import text

from app.jobs.tables import DONE
from tests.scaleout.conftest import Cluster, Worker, wait_for
from tests.scaleout.test_celery import check_results, make_tasks, pid_of, submit, wait_completed

RECOVERY_S = 60.0  # what the issue promises with the default settings

WRITE_LOG = [
    "CREATE TABLE task_writes (job_id text, idx integer, status text)",
    """CREATE FUNCTION log_task_write() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status IN ('done', 'failed') THEN
            INSERT INTO task_writes VALUES (NEW.job_id, NEW.idx, NEW.status);
        END IF;
        RETURN NEW;
    END $$""",
    """CREATE TRIGGER log_task_write AFTER UPDATE ON jvp_job_tasks
    FOR EACH ROW EXECUTE FUNCTION log_task_write()""",
]


def log_writes(cluster: Cluster) -> None:
    """Start counting task writes (the tables exist once an API process is ready)."""
    with cluster.store.engine.begin() as conn:
        for statement in WRITE_LOG:
            conn.execute(text(statement))


def writes(cluster: Cluster, job_id: str) -> dict[int, int]:
    with cluster.store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT idx, count(*) FROM task_writes WHERE job_id = :j GROUP BY idx"),
            {"j": job_id},
        ).all()
    return {int(idx): int(n) for idx, n in rows}


def running_on(cluster: Cluster, job_id: str, workers: list[Worker]) -> Worker | None:
    """A worker computing a task of the job now, if any."""
    for row in cluster.tasks(job_id).values():
        if row.status == "running" and row.worker:
            for w in workers:
                if pid_of(row.worker) in w.children():
                    return w
    return None


def check_once(cluster: Cluster, api_url: str, job_id: str, tasks: list) -> None:  # type: ignore[type-arg]
    check_results(api_url, job_id, tasks)
    assert cluster.store.task_counts(job_id) == {DONE: len(tasks)}
    assert writes(cluster, job_id) == dict.fromkeys(range(len(tasks)), 1)


def lose_worker_mid_job(cluster: Cluster, how: str) -> None:
    workers = [cluster.worker(JVP_CELERY_TASK_DELAY_S="1") for _ in range(2)]
    api = cluster.api()
    for w in workers:
        w.wait_ready()
    log_writes(cluster)
    tasks = make_tasks(96, seed=20)  # 6 chunks of 16 (the default chunk size), 1 s each
    job_id = submit(api.url, tasks)
    found = wait_for(lambda: running_on(cluster, job_id, workers), 30, "a chunk to start")
    assert isinstance(found, Worker)
    held = {
        i
        for i, r in cluster.tasks(job_id).items()
        if r.status == "running" and pid_of(r.worker) in found.children()
    }
    getattr(found, how)()  # kill: SIGKILL to the group; stop: SIGSTOP, never resumed
    lost_at = time.monotonic()

    job = wait_completed(api.url, job_id, RECOVERY_S)

    took = time.monotonic() - lost_at
    print(f"{how}: job completed {took:.1f} s after the worker was lost")  # shown with -s
    assert took < RECOVERY_S
    assert (job["total"], job["done"], job["failed"]) == (96, 96, 0)
    check_once(cluster, api.url, job_id, tasks)
    rows = cluster.tasks(job_id)
    survivor = next(w for w in workers if w is not found)
    for i in held:  # computed again, by the worker still there
        assert rows[i].attempts == 2, (i, rows[i].attempts)
        assert pid_of(rows[i].worker) in survivor.children()


@pytest.mark.parametrize("broker", ["amqp", "redis"], indirect=True)
def test_complete_job_within_60s_of_sigkill_to_whole_worker(cluster: Cluster) -> None:
    lose_worker_mid_job(cluster, "kill")


@pytest.mark.parametrize("broker", ["amqp", "redis"], indirect=True)
def test_complete_job_within_60s_of_worker_stopped_for_good(cluster: Cluster) -> None:
    lose_worker_mid_job(cluster, "stop")


def test_complete_job_within_60s_of_api_killed_mid_dispatch(cluster: Cluster) -> None:
    worker = cluster.worker()
    # One chunk sent every 0.5 s: the first API process dies with most of the job unsent.
    first = cluster.api(JVP_CELERY_CHUNK_SIZE="4", JVP_CELERY_DISPATCH_DELAY_S="0.5")
    second = cluster.api()
    worker.wait_ready()
    log_writes(cluster)
    tasks = make_tasks(80, seed=21)  # 20 chunks: 10 s to send
    job_id = submit(first.url, tasks)
    wait_for(lambda: cluster.store.get_job(job_id).done >= 4, 30, "the first chunk's results")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    killed_at = time.monotonic()
    assert cluster.store.undispatched() == [job_id]  # it died mid-dispatch

    job = wait_completed(second.url, job_id, RECOVERY_S)

    took = time.monotonic() - killed_at
    print(f"api killed mid-dispatch: job completed {took:.1f} s after")  # shown with -s
    assert took < RECOVERY_S
    assert (job["total"], job["done"], job["failed"]) == (80, 80, 0)
    check_once(cluster, second.url, job_id, tasks)
    assert {r.attempts for r in cluster.tasks(job_id).values()} == {1}  # none computed twice
