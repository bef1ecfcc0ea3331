"""The durable job store: SQLAlchemy 2 over SQLite (the embedded default) or PostgreSQL.

Every method is synchronous and short; the async callers run them in a thread.

# NOTE [durable jobs]
- `create_job` commits the job and all its tasks in one transaction before the route
  answers 202, so an answered job survives a crash (SQLite: WAL with synchronous=FULL,
  set on every connection).
- A runner `claim`s queued tasks (marking them running) and later `record`s their
  outcomes. `record` writes a task only while it is still queued or running and bumps the
  job's counters in the same transaction; a task already ended is left alone. So a task
  that ran twice (a crash after computing, before the commit; a restart that re-ran it)
  is written and counted once.
- At start, `recover` puts every task left running by a dead process back in the queue
  (and ends those of cancelled jobs), so nothing is lost.
"""

# NOTE [one module: the job store]
# Over 450 lines on purpose: every transaction on the job tables, one method each, sharing
# the session helpers and the invariants of NOTE [durable jobs] (a task's outcome written
# only while it has not ended, counters bumped in the same transaction).

from __future__ import annotations

import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Engine,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.engine.errors import InvalidRequest, NotFound
from app.jobs.events import NOTIFY, JobEvents, Listener
from app.jobs.tables import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    JobRow,
    JobStatus,
    TaskRow,
    among,
)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)  # job statuses whose tasks may still run


def now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every time stored here is UTC.
    if t is None or t.tzinfo is not None:
        return t
    return t.replace(tzinfo=UTC)


@dataclass(frozen=True)
class JobView:
    """A job's state as read from the store."""

    id: str
    status: str
    total: int
    done: int
    failed: int
    cancelled: int
    expression: str | None
    model: str | None
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Task index -> Newton iterations of the solve tasks a worker reports computing.
    progress: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, row: JobRow, progress: dict[int, int] | None = None) -> JobView:
        return cls(
            id=row.id,
            status=row.status,
            total=row.total,
            done=row.done,
            failed=row.failed,
            cancelled=row.cancelled,
            expression=row.expression,
            model=row.model,
            options=json.loads(row.options),
            created_at=_aware(row.created_at) or now(),
            updated_at=_aware(row.updated_at) or now(),
            started_at=_aware(row.started_at),
            finished_at=_aware(row.finished_at),
            progress=progress or {},
        )

    def eta_s(self, at: datetime) -> float | None:
        """Seconds left at the rate so far; 0 once finished, None before any rate."""
        if self.status not in ACTIVE:
            return 0.0
        if self.started_at is None or self.done == 0:
            return None
        elapsed = max((at - self.started_at).total_seconds(), 0.0)
        return round(elapsed / self.done * (self.total - self.done), 3)


@dataclass
class NewTask:
    idx: int
    expression: str | None = None  # only where it differs from the job's
    model: str | None = None
    options: dict[str, Any] | None = None  # only the fields the task sets
    inputs: bytes | None = None
    error: tuple[str, str, str | None] | None = None  # (type, message, param): failed at submit
    batch_key: str | None = None  # tasks with one key may compute as one batch (celery chunks)


@dataclass
class NewJob:
    expression: str | None
    model: str | None
    options: dict[str, Any]
    tasks: list[NewTask]
    idempotency_key: str | None = None
    body_sha256: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TaskSpec:
    """A claimed task: what to compute (job defaults merged with the task's overrides)."""

    job_id: str
    idx: int
    expression: str | None
    model: str | None
    options: dict[str, Any]
    inputs: bytes


@dataclass(frozen=True)
class Outcome:
    """How a task ended: `kind` is done (result), failed (error), cancelled, or queued (put
    back: the runner stopped before it ran)."""

    job_id: str
    idx: int
    kind: str
    result: bytes | None = None
    error: tuple[str, str, str | None] | None = None


@dataclass(frozen=True)
class Attempt:
    """What `start_attempt` made of a chunk: tasks to compute now (marked running, their
    attempt counted and committed), tasks whose worker was lost too often (index, attempts
    so far), and tasks of a cancelled job that must not run."""

    run: list[TaskSpec]
    lost: list[tuple[int, int]]
    cancelled: list[int]


@dataclass(frozen=True)
class StoredTask:
    idx: int
    status: str
    result: bytes | None
    error: tuple[str, str, str | None] | None
    encoding: str


def _merged(job_options: dict[str, Any], task_options: str | None) -> dict[str, Any]:
    return {**job_options, **(json.loads(task_options) if task_options else {})}


class JobStore:
    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _sqlite_events(self.engine)
            # Writers take the write lock when they begin, not halfway through (a read
            # that turns into a write in WAL mode fails at once instead of waiting).
            self._write_engine: Engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        else:
            self._write_engine = self.engine
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        self.events = JobEvents()  # NOTE [finished-job events]
        self._listener: Listener | None = None

    def migrate(self) -> None:
        """Bring the tables to the newest revision (Alembic, `app/jobs/migrations`)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._write_engine.begin() as connection:
            if not self.is_sqlite:
                # API replicas and workers start together: one migrates, the others wait
                # (then find the tables at head). SQLite serializes by BEGIN IMMEDIATE.
                connection.execute(text("SELECT pg_advisory_xact_lock(7315001)"))
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self.engine.dispose()

    @contextmanager
    def writing(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    # -- the API's side ------------------------------------------------------------------

    def create_job(self, job: NewJob) -> tuple[JobView, bool]:
        """Store a job and its tasks in one transaction. Returns (job, created): with an
        idempotency key already used for the same body, the job made then (created False)."""
        if job.idempotency_key is not None:
            existing = self._by_key(job)
            if existing is not None:
                return existing, False
        at = now()
        failed = sum(1 for t in job.tasks if t.error is not None)
        total = len(job.tasks)
        try:
            with self.writing() as s:
                s.execute(
                    insert(JobRow).values(
                        id=job.id,
                        status=JobStatus.COMPLETED if failed == total else JobStatus.QUEUED,
                        total=total,
                        done=failed,
                        failed=failed,
                        cancelled=0,
                        expression=job.expression,
                        model=job.model,
                        options=json.dumps(job.options),
                        idempotency_key=job.idempotency_key,
                        body_sha256=job.body_sha256,
                        created_at=at,
                        updated_at=at,
                        finished_at=at if failed == total else None,
                    )
                )
                # The Core table, not the ORM class: the ORM's bulk insert checks every
                # row's keys against the mapper (a quarter of a 2,000-task POST /jobs).
                tasks = TaskRow.__table__
                assert isinstance(tasks, Table)
                for start in range(0, total, 5000):
                    s.execute(
                        insert(tasks),
                        [_task_row(job.id, t) for t in job.tasks[start : start + 5000]],
                    )
        except IntegrityError:
            # Another request with the same idempotency key won the race.
            existing = self._by_key(job) if job.idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return self.get_job(job.id), True

    def _by_key(self, job: NewJob) -> JobView | None:
        with self.reading() as s:
            row = s.scalars(
                select(JobRow).where(JobRow.idempotency_key == job.idempotency_key)
            ).first()
            if row is None:
                return None
            if row.body_sha256 != job.body_sha256:
                raise InvalidRequest(
                    f"Idempotency-Key {job.idempotency_key!r} was used for job {row.id} with "
                    "a different body; use a new key for a new job",
                    param="Idempotency-Key",
                )
            return JobView.of(row)

    def get_job(self, job_id: str) -> JobView:
        """The job, with the progress its running solve tasks' workers wrote."""
        with self.reading() as s:
            row = self._job(s, job_id)
            if row.status != JobStatus.RUNNING:
                return JobView.of(row)
            query = select(TaskRow.idx, TaskRow.progress).where(
                TaskRow.job_id == job_id,
                TaskRow.status == RUNNING,
                TaskRow.progress.is_not(None),
            )
            found = {idx: n for idx, n in s.execute(query) if n is not None}
            return JobView.of(row, found)

    @staticmethod
    def _job(s: Session, job_id: str) -> JobRow:
        row = s.scalars(select(JobRow).where(JobRow.id == job_id)).first()
        if row is None:
            raise NotFound(f"No job {job_id!r}; GET /jobs lists the jobs", param="id")
        return row

    def list_jobs(self, *, offset: int, limit: int, status: str | None) -> list[JobView]:
        """Newest first."""
        query = select(JobRow).order_by(JobRow.seq.desc()).offset(offset).limit(limit)
        if status is not None:
            query = query.where(JobRow.status == status)
        with self.reading() as s:
            return [JobView.of(row) for row in s.scalars(query)]

    def cancel(self, job_id: str) -> JobView:
        """Cancel an active job: its queued tasks never run. A finished job is left as is."""
        with self.writing() as s:
            row = self._job(s, job_id)
            if row.status in ACTIVE:
                at = now()
                count = s.execute(
                    update(TaskRow)
                    .where(TaskRow.job_id == job_id, TaskRow.status == QUEUED)
                    .values(status=CANCELLED)
                ).rowcount  # type: ignore[attr-defined]
                row.status = JobStatus.CANCELLED
                row.cancelled += count
                row.updated_at = at
                row.finished_at = at
                if not self.is_sqlite:
                    s.execute(text(NOTIFY), {"job_id": job_id})
        self._finished([job_id])
        return self.get_job(job_id)

    def results(self, job_id: str, *, offset: int, limit: int) -> tuple[JobView, list[StoredTask]]:
        """Tasks of [offset, offset + limit) that have ended (or were cancelled), in order."""
        with self.reading() as s:
            job = JobView.of(self._job(s, job_id))
            rows = s.execute(
                select(
                    TaskRow.idx,
                    TaskRow.status,
                    TaskRow.result,
                    TaskRow.error_type,
                    TaskRow.error_message,
                    TaskRow.error_param,
                    TaskRow.options,
                )
                .where(
                    TaskRow.job_id == job_id,
                    TaskRow.idx >= offset,
                    TaskRow.idx < offset + limit,
                    TaskRow.status.in_((DONE, FAILED, CANCELLED)),
                )
                .order_by(TaskRow.idx)
            ).all()
        tasks = [
            StoredTask(
                idx=r.idx,
                status=r.status,
                result=r.result,
                error=(r.error_type, r.error_message, r.error_param)
                if r.error_type is not None
                else None,
                encoding=_merged(job.options, r.options).get("encoding") or "json",
            )
            for r in rows
        ]
        return job, tasks

    # -- the runner's side ---------------------------------------------------------------

    def recover(self) -> int:
        """At start: tasks left running by a process that died go back to the queue (those of
        a cancelled job end as cancelled). Returns how many were put back."""
        with self.writing() as s:
            requeued = s.execute(
                update(TaskRow)
                .where(
                    TaskRow.status == RUNNING,
                    TaskRow.job_id.in_(select(JobRow.id).where(JobRow.status.in_(ACTIVE))),
                )
                .values(status=QUEUED)
            ).rowcount  # type: ignore[attr-defined]
            stale = s.execute(
                select(TaskRow.job_id, func.count())
                .join(JobRow, JobRow.id == TaskRow.job_id)
                .where(JobRow.status == JobStatus.CANCELLED, TaskRow.status.in_((QUEUED, RUNNING)))
                .group_by(TaskRow.job_id)
            ).all()
            for job_id, count in stale:
                s.execute(
                    update(TaskRow)
                    .where(TaskRow.job_id == job_id, TaskRow.status.in_((QUEUED, RUNNING)))
                    .values(status=CANCELLED)
                )
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id)
                    .values(cancelled=JobRow.cancelled + count)
                )
        return int(requeued)

    def claim(self, limit: int, *, skip_jobs: Sequence[str] = ()) -> list[TaskSpec]:
        """Mark up to `limit` queued tasks running (oldest job first, in task order)."""
        claimed: list[TaskSpec] = []
        with self.writing() as s:
            jobs = s.scalars(
                select(JobRow).where(JobRow.status.in_(ACTIVE)).order_by(JobRow.seq)
            ).all()
            for job in jobs:
                if job.id in skip_jobs:
                    continue
                want = limit - len(claimed)
                if want <= 0:
                    break
                query = (
                    select(TaskRow.idx, TaskRow.expression, TaskRow.model, TaskRow.options)
                    .add_columns(TaskRow.inputs)
                    .where(TaskRow.job_id == job.id, TaskRow.status == QUEUED)
                    .order_by(TaskRow.idx)
                    .limit(want)
                )
                if not self.is_sqlite:
                    query = query.with_for_update(skip_locked=True)
                rows = s.execute(query).all()
                if not rows:
                    continue
                s.execute(
                    update(TaskRow)
                    .where(
                        TaskRow.job_id == job.id,
                        *among([r.idx for r in rows]),  # NOTE [runs of indices]
                        TaskRow.status == QUEUED,
                    )
                    .values(status=RUNNING, attempts=TaskRow.attempts + 1)
                )
                _started(job)
                defaults = json.loads(job.options)
                for r in rows:
                    overridden = r.expression is not None or r.model is not None
                    claimed.append(
                        TaskSpec(
                            job_id=job.id,
                            idx=r.idx,
                            expression=r.expression if overridden else job.expression,
                            model=r.model if overridden else job.model,
                            options=_merged(defaults, r.options),
                            inputs=r.inputs or b"",
                        )
                    )
        return claimed

    # A long method on purpose: one transaction whose steps must stay together (the
    # not-ended guard, the counters, the job's completion; NOTE [durable jobs]).
    def record(self, outcomes: Sequence[Outcome], *, worker: str | None = None) -> int:
        """Write outcomes in one transaction, each only if its task has not ended yet
        (NOTE [durable jobs]) and, with `worker`, only while that worker holds the task (a
        worker that was presumed lost and resumed writes nothing: NOTE [task leases]).
        Returns how many were written."""
        if not outcomes:
            return 0
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        by_job: dict[str, list[Outcome]] = defaultdict(list)
        for o in outcomes:
            by_job[o.job_id].append(o)
        if not self.is_sqlite:
            from app.jobs import store_pg  # NOTE [bulk result writes]

            with self.writing() as s:
                at = now()
                written = {j: store_pg.write(s, j, g, worker, at) for j, g in by_job.items()}
            self._finished([j for j, (_, completed) in written.items() if completed])
            return sum(n for n, _ in written.values())
        rows: list[dict[str, Any]] = []
        completed: list[str] = []
        tasks = TaskRow.__table__
        assert isinstance(tasks, Table)
        with self.writing() as s:
            for job_id, group in by_job.items():
                # Read the statuses inside the write transaction (SQLite: BEGIN IMMEDIATE;
                # PostgreSQL: the rows locked), so none can change before the update.
                query = select(TaskRow.idx, TaskRow.status, TaskRow.worker).where(
                    TaskRow.job_id == job_id, *among([o.idx for o in group])
                )
                if not self.is_sqlite:
                    query = query.with_for_update()
                found = s.execute(query).all()
                status: dict[int, str] = {r.idx: r.status for r in found}
                if worker is not None:  # only the tasks this worker holds
                    status = {r.idx: r.status for r in found if r.worker == worker}
                for o in group:
                    allowed = (RUNNING,) if o.kind == QUEUED else (QUEUED, RUNNING)
                    if status.get(o.idx) not in allowed:
                        continue  # already ended (or put back): written once, counted once
                    status[o.idx] = o.kind
                    error = o.error or (None, None, None)
                    rows.append(
                        {
                            "j": job_id,
                            "i": o.idx,
                            "status": o.kind,
                            "result": o.result,
                            "error_type": error[0],
                            "error_message": error[1],
                            "error_param": error[2],
                        }
                    )
                    counts[job_id][o.kind] += 1
            if rows:
                s.execute(
                    update(tasks)
                    .where(tasks.c.job_id == bindparam("j"), tasks.c.idx == bindparam("i"))
                    .values(
                        status=bindparam("status"),
                        result=bindparam("result"),
                        error_type=bindparam("error_type"),
                        error_message=bindparam("error_message"),
                        error_param=bindparam("error_param"),
                    ),
                    rows,
                )
            at = now()
            for job_id, c in counts.items():
                ended = c[DONE] + c[FAILED]
                s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id)
                    .values(
                        done=JobRow.done + ended,
                        failed=JobRow.failed + c[FAILED],
                        cancelled=JobRow.cancelled + c[CANCELLED],
                        updated_at=at,
                    )
                )
                ended_job = s.execute(
                    update(JobRow)
                    .where(
                        JobRow.id == job_id,
                        JobRow.status.in_(ACTIVE),
                        JobRow.done + JobRow.cancelled >= JobRow.total,
                    )
                    .values(status=JobStatus.COMPLETED, finished_at=at)
                )
                if ended_job.rowcount:  # type: ignore[attr-defined]
                    completed.append(job_id)
        self._finished(completed)
        return len(rows)

    def _finished(self, job_ids: Sequence[str]) -> None:
        """Wake this process's waiters for jobs whose end was just committed (NOTE
        [finished-job events]: other processes hear PostgreSQL's NOTIFY)."""
        for job_id in job_ids:
            self.events.notify(job_id)

    def listen(self) -> None:
        """Hear of jobs finished in other processes (PostgreSQL's LISTEN, in a thread); on
        SQLite only this process writes, and `events` hears it all already."""
        if self.is_sqlite or self._listener is not None:
            return
        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listener = Listener(conninfo, self.events).start()

    # -- the Celery backend (app/jobs/celery_backend.py) ------------------------------------

    def dispatch_plan(self, job_id: str) -> list[tuple[int, str | None]]:
        """(index, batch key) of the job's queued tasks, in order: what the broker gets."""
        with self.reading() as s:
            rows = s.execute(
                select(TaskRow.idx, TaskRow.batch_key)
                .where(TaskRow.job_id == job_id, TaskRow.status == QUEUED)
                .order_by(TaskRow.idx)
            ).all()
        return [(r.idx, r.batch_key) for r in rows]

    def input_bytes(self, job_id: str) -> int:
        """Bytes of the inputs of the job's queued tasks (what its chunks will carry)."""
        with self.reading() as s:
            total = s.scalar(
                select(func.coalesce(func.sum(func.length(TaskRow.inputs)), 0)).where(
                    TaskRow.job_id == job_id, TaskRow.status == QUEUED
                )
            )
        return int(total or 0)

    def mark_dispatched(self, job_id: str) -> None:
        with self.writing() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(dispatched_at=now()))

    def undispatched(self, *, created_before: datetime | None = None) -> list[str]:
        """Active jobs whose task ids never reached the broker (an API process died between
        storing a job and sending it), oldest first."""
        query = (
            select(JobRow.id)
            .where(JobRow.status.in_(ACTIVE), JobRow.dispatched_at.is_(None))
            .order_by(JobRow.seq)
        )
        if created_before is not None:
            query = query.where(JobRow.created_at < created_before)
        with self.reading() as s:
            return list(s.scalars(query))

    # A long method on purpose: one transaction (NOTE [celery delivery]): count the start,
    # fail the tasks that lost their worker too often, skip the cancelled ones.
    def start_attempt(
        self,
        job_id: str,
        idxs: Sequence[int],
        *,
        worker: str,
        max_attempts: int,
        lease_s: float,
        is_dead: Callable[[str | None], bool] = lambda _: False,
    ) -> Attempt:
        """Start a chunk on a worker, committed before anything is computed: each task still
        queued, or running on a worker that no longer holds it (its lease lapsed, or
        `is_dead(worker)`: NOTE [task leases] in app/jobs/leases.py), gets attempts + 1, this
        worker and a lease of `lease_s`, unless it already started `max_attempts` times.
        Tasks that ended, and tasks another live worker holds, are left alone (a chunk
        delivered twice computes only what is missing, once)."""
        run: list[TaskSpec] = []
        lost: list[tuple[int, int]] = []
        cancelled: list[int] = []
        at = now()
        if not idxs:
            return Attempt(run, lost, cancelled)
        with self.writing() as s:
            job = s.scalars(select(JobRow).where(JobRow.id == job_id)).first()
            if job is None:  # purged, or another deployment's message
                return Attempt(run, lost, cancelled)
            query = (
                select(
                    TaskRow.idx,
                    TaskRow.status,
                    TaskRow.attempts,
                    TaskRow.worker,
                    TaskRow.lease_until,
                    TaskRow.expression,
                    TaskRow.model,
                    TaskRow.options,
                )
                .add_columns(TaskRow.inputs)
                .where(
                    TaskRow.job_id == job_id,
                    *among(idxs),  # NOTE [runs of indices]
                    TaskRow.status.in_((QUEUED, RUNNING)),
                )
                .order_by(TaskRow.idx)
            )
            if not self.is_sqlite:
                query = query.with_for_update()
            rows = s.execute(query).all()
            if job.status not in ACTIVE:
                return Attempt(run, lost, [r.idx for r in rows])
            starting = []
            defaults = json.loads(job.options)
            for r in rows:
                if r.status == RUNNING and held(r.lease_until, at) and not is_dead(r.worker):
                    continue  # another worker computes it now
                if r.attempts >= max_attempts:
                    lost.append((r.idx, r.attempts))
                    continue
                starting.append(r.idx)
                overridden = r.expression is not None or r.model is not None
                run.append(
                    TaskSpec(
                        job_id=job_id,
                        idx=r.idx,
                        expression=r.expression if overridden else job.expression,
                        model=r.model if overridden else job.model,
                        options=_merged(defaults, r.options),
                        inputs=r.inputs or b"",
                    )
                )
            if starting:
                s.execute(
                    update(TaskRow)
                    .where(
                        TaskRow.job_id == job_id,
                        *among(starting),
                    )
                    .values(
                        status=RUNNING,
                        attempts=TaskRow.attempts + 1,
                        worker=worker,
                        lease_until=at + timedelta(seconds=lease_s),
                    )
                )
                _started(job)
        return Attempt(run, lost, cancelled)

    def purge(self, retention_s: float) -> int:
        """Remove jobs finished more than `retention_s` ago. Returns how many."""
        cutoff = now() - timedelta(seconds=retention_s)
        with self.writing() as s:
            ids = s.scalars(
                select(JobRow.id)
                .where(JobRow.status.not_in(ACTIVE), JobRow.finished_at < cutoff)
                .limit(100)
            ).all()
            if ids:
                s.execute(delete(TaskRow).where(TaskRow.job_id.in_(ids)))
                s.execute(delete(JobRow).where(JobRow.id.in_(ids)))
        return len(ids)

    def active_task_counts(self) -> dict[str, int]:
        """Tasks queued and running now, across every job of the store (what the gauge
        ``jvp_job_tasks_active`` shows: the store is shared by every API process)."""
        with self.reading() as s:
            rows = s.execute(
                select(TaskRow.status, func.count())
                .join(JobRow, JobRow.id == TaskRow.job_id)
                .where(JobRow.status.in_(ACTIVE), TaskRow.status.in_((QUEUED, RUNNING)))
                .group_by(TaskRow.status)
            ).all()
        return {status: int(n) for status, n in rows}

    def task_counts(self, job_id: str) -> dict[str, int]:
        """Tasks of a job by status, counted from the task rows (checks and tests)."""
        with self.reading() as s:
            rows = s.execute(
                select(TaskRow.status, func.count())
                .where(TaskRow.job_id == job_id)
                .group_by(TaskRow.status)
            ).all()
        return {status: int(n) for status, n in rows}


def held(lease_until: datetime | None, at: datetime) -> bool:
    """Whether a running task's lease still holds at `at` (none: a start before leases)."""
    lease = _aware(lease_until)
    return lease is not None and lease > at


def _started(job: JobRow) -> None:
    """A job one of whose tasks starts now: running, since now if it had not started."""
    at = now()
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.RUNNING
    if job.started_at is None:
        job.started_at = at
    job.updated_at = at


def _task_row(job_id: str, t: NewTask) -> dict[str, Any]:
    error = t.error or (None, None, None)
    return {
        "job_id": job_id,
        "idx": t.idx,
        "status": FAILED if t.error is not None else QUEUED,
        "expression": t.expression,
        "model": t.model,
        "options": json.dumps(t.options) if t.options else None,
        "inputs": t.inputs,
        "result": None,
        "error_type": error[0],
        "error_message": error[1],
        "error_param": error[2],
        "attempts": 0,
        "batch_key": t.batch_key,
    }


def _sqlite_events(engine: Engine) -> None:
    """WAL and synchronous=FULL on every connection; transactions begun by us, not pysqlite
    (SQLAlchemy's documented recipe), so writers can BEGIN IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


__all__ = ["Attempt", "JobStore", "JobView", "NewJob", "NewTask", "Outcome", "TaskSpec"]
