"""Leases on running tasks (Celery backend): a worker holds the tasks it computes for
JVP_CELERY_LEASE_S at a time and renews them while it computes; any API process takes back
the tasks whose lease lapsed and sends them to the broker again.

# NOTE [task leases]
Why leases in the job store, on top of the broker's redelivery (NOTE [celery delivery]):
- A worker can vanish without its broker connection closing. A SIGSTOPped worker (or one
  frozen by a hung NFS mount, a paused VM, a half-open TCP connection to a lost machine)
  keeps its socket: RabbitMQ requeues its unacknowledged chunk only when the AMQP
  heartbeat gives up on the connection (about the negotiated timeout: frames every
  timeout/2, dead after two missed), and Redis only after its visibility timeout (an hour
  here, since it must outlast the longest healthy chunk). A worker whose main process
  answers heartbeats while its pool child is stopped is never caught by the broker.
- A lease catches all of these the same way, on any broker: the pool child renews the
  leases of the chunk it computes every lease/4 seconds (`LeaseKeeper`, a thread beside
  the compute); a frozen or dead child renews nothing, and within JVP_CELERY_LEASE_S
  (20 s by default) its tasks are free. The dispatcher thread of every API process looks
  for lapsed leases every lease/4 seconds (`reclaim_lapsed`, rows locked with SKIP LOCKED,
  so two API processes never take the same task) and sends them again: the job finishes
  within about lease * 1.25 plus the chunk's compute of the loss, whatever the broker.
- A chunk delivered while its tasks are held (RabbitMQ requeued it at once because the
  worker's connection dropped, while the lease still runs) starts only what is free:
  `JobStore.start_attempt` skips tasks another live worker holds. A lease held by a
  worker on this host whose process is gone (`local_worker_dead`: no such pid, or a
  zombie) counts as free, so a SIGKILLed worker's chunk restarts at once on a second
  worker of the same machine instead of waiting out the lease.
- Nothing is computed twice into the results: `JobStore.record(worker=...)` writes a
  task only while that worker holds it, so a stopped worker that resumes after its
  tasks were taken over (and renews nothing: renewals are fenced the same way) writes
  none of them.
- Leases are stamped and compared with each host's clock (UTC): hosts must keep their
  clocks within a few seconds of each other (NTP), or a skew near JVP_CELERY_LEASE_S makes
  an API process take back tasks still computing (wasted work, never a double write: the
  fence above).
- What a lease cannot see: a chunk a worker received but had not started (the moments
  between delivery and the committed start). RabbitMQ requeues it when the connection
  goes (at once on a kill; after the heartbeat, JVP_CELERY_BROKER_HEARTBEAT_S, on a stop);
  Redis only after its visibility timeout. That is why RabbitMQ is the default broker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType

from sqlalchemy import select, update

from app.jobs.store import ACTIVE, JobStore, now
from app.jobs.tables import QUEUED, RUNNING, JobRow, TaskRow, among

log = logging.getLogger("app.jobs.celery")

RECLAIM_BATCH = 10_000  # tasks taken back per transaction

# (job id, [(index, batch key), ...]) of tasks taken back: what the dispatcher sends again.
Send = Callable[[str, list[tuple[int, str | None]]], object]


def renew(store: JobStore, job_id: str, idxs: Sequence[int], *, worker: str, lease_s: float) -> int:
    """Extend `worker`'s lease on the tasks of `idxs` it still holds (running, its own).
    Returns how many it holds."""
    with store.writing() as s:
        count = s.execute(
            update(TaskRow)
            .where(
                TaskRow.job_id == job_id,
                *among(idxs),  # NOTE [runs of indices]
                TaskRow.status == RUNNING,
                TaskRow.worker == worker,
            )
            .values(lease_until=now() + timedelta(seconds=lease_s))
        ).rowcount  # type: ignore[attr-defined]
    return int(count)


# NOTE [progress across processes]
# A solve task's Newton iterations reach GET /jobs/{id} as `progress`. The local runner
# computes in the API process, which reads them from memory (app/jobs/solve_tasks.py). A
# Celery worker is another process, maybe another machine: its chunk's LeaseKeeper, the
# thread that renews the chunk's leases, also writes each solve task's count to the task's
# row when it changed, at most every PROGRESS_INTERVAL_S (one UPDATE per changed task,
# guarded like a renewal: only while the task runs on this worker), and GET /jobs/{id}
# reads the counts of the job's running tasks from the store with the job.
PROGRESS_INTERVAL_S = 1.0


def write_progress(store: JobStore, job_id: str, progress: dict[int, int], *, worker: str) -> None:
    """Record Newton iterations of `worker`'s running solve tasks (index -> iterations)."""
    with store.writing() as s:
        for idx, n in progress.items():
            s.execute(
                update(TaskRow)
                .where(
                    TaskRow.job_id == job_id,
                    TaskRow.idx == idx,
                    TaskRow.status == RUNNING,
                    TaskRow.worker == worker,
                )
                .values(progress=n)
            )


def reclaim_lapsed(store: JobStore, send: Send) -> int:
    """Put running tasks of active jobs whose lease lapsed back in the queue and `send`
    them (inside the transaction: a crash before the commit leaves them lapsed, to be
    taken again; a message sent for them finds them free either way). Returns how many."""
    at = now()
    with store.writing() as s:
        query = (
            select(TaskRow.job_id, TaskRow.idx, TaskRow.batch_key)
            .join(JobRow, JobRow.id == TaskRow.job_id)
            .where(
                JobRow.status.in_(ACTIVE),
                TaskRow.status == RUNNING,
                TaskRow.lease_until.is_not(None),
                TaskRow.lease_until < at,
            )
            .order_by(TaskRow.job_id, TaskRow.idx)
            .limit(RECLAIM_BATCH)
        )
        if not store.is_sqlite:
            query = query.with_for_update(of=TaskRow, skip_locked=True)
        by_job: dict[str, list[tuple[int, str | None]]] = defaultdict(list)
        for r in s.execute(query):
            by_job[r.job_id].append((r.idx, r.batch_key))
        for job_id, plan in by_job.items():
            s.execute(
                update(TaskRow)
                .where(
                    TaskRow.job_id == job_id,
                    *among([i for i, _ in plan]),
                )
                .values(status=QUEUED, lease_until=None)
            )
            send(job_id, plan)
    taken = sum(len(plan) for plan in by_job.values())
    if taken:
        log.warning(
            "jobs: %d task(s) of %d job(s) lost their worker (lease lapsed): sent again",
            taken,
            len(by_job),
        )
    return taken


def local_worker_dead(worker: str | None) -> bool:
    """Whether `worker` ("host:pid", `WorkerRuntime.worker_id`) is a process of this host
    that is gone (or a zombie). A worker of another host is never presumed dead here."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


class LeaseKeeper:
    """Renews `worker`'s lease on a chunk every lease/4 seconds while the block computes, and
    writes the progress of its solve tasks (``progress(idx)``: Newton iterations so far, or
    None) every `PROGRESS_INTERVAL_S` (NOTE [progress across processes])."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        idxs: Sequence[int],
        *,
        worker: str,
        lease_s: float,
        progress: Callable[[int], int | None] | None = None,
    ) -> None:
        self._args = (store, job_id, list(idxs))
        self._worker = worker
        self._lease_s = lease_s
        self._progress = progress
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jobs-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        store, job_id, idxs = self._args
        every = self._lease_s / 4
        wake = every if self._progress is None else min(every, PROGRESS_INTERVAL_S)
        renewal = time.monotonic() + every
        written: dict[int, int] = {}
        while not self._done.wait(wake):
            try:
                if self._progress is not None:
                    self._write_progress(written)
                if time.monotonic() >= renewal:
                    renewal += every
                    renew(store, job_id, idxs, worker=self._worker, lease_s=self._lease_s)
            except Exception:  # noqa: BLE001 - the store is down: the next renewal tries again
                log.exception("jobs: renewing the lease of a chunk of job %s failed", job_id)

    def _write_progress(self, written: dict[int, int]) -> None:
        store, job_id, idxs = self._args
        assert self._progress is not None
        new = {i: n for i in idxs if (n := self._progress(i)) is not None and written.get(i) != n}
        if new:
            write_progress(store, job_id, new, worker=self._worker)
            written.update(new)


__all__ = ["LeaseKeeper", "local_worker_dead", "reclaim_lapsed", "renew", "write_progress"]
