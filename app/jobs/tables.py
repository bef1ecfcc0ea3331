"""The job store's tables (SQLAlchemy 2). `migrations/versions/` creates the same tables.

A task's inputs and result are safetensors blobs (app/jobs/blobs.py), never JSON lists.
The key (job_id, idx) makes a task's result row unique; the runner writes it only while the
task is still queued or running, and bumps the job's counters in the same transaction, so a
task that runs twice (a crash between compute and commit) is counted once.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement


class TaskStatus(StrEnum):
    """A task's state (``TaskRow.status``): queued, running, then done or failed; or
    cancelled before it ran."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobStatus(StrEnum):
    """A job's state (``JobRow.status``): "queued" until a task starts, "running" until
    every task has ended, then "completed"; or "cancelled". A job completes, a task is done:
    two words for two things."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


QUEUED, RUNNING, DONE, FAILED, CANCELLED = TaskStatus


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jvp_jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    expression: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(255))
    options: Mapped[str] = mapped_column(Text)  # JSON of JobOptions (set fields only)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    body_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    # Celery backend: when the job's task ids were sent to the broker (null: not yet).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TaskRow(Base):
    __tablename__ = "jvp_job_tasks"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jvp_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    expression: Mapped[str | None] = mapped_column(Text)  # overrides, else the job's
    model: Mapped[str | None] = mapped_column(String(255))
    options: Mapped[str | None] = mapped_column(Text)  # JSON, merged over the job's
    inputs: Mapped[bytes | None] = mapped_column(LargeBinary)  # safetensors
    result: Mapped[bytes | None] = mapped_column(LargeBinary)  # safetensors
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # starts on a worker
    worker: Mapped[str | None] = mapped_column(String(255))  # "host:pid" of the last start
    # Celery backend: a running task's worker holds it until then (NOTE [task leases]).
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Tasks of a job with the same key (function, options, shapes) are chunked together.
    batch_key: Mapped[str | None] = mapped_column(String(64))
    # A solve task on a Celery worker: Newton iterations done so far (NOTE [progress across
    # processes] in app/jobs/leases.py).
    progress: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index("ix_jvp_job_tasks_job_status_idx", "job_id", "status", "idx"),)


def among(idxs: Collection[int]) -> list[ColumnElement[bool]]:
    """WHERE terms for the tasks of a chunk: ``idx BETWEEN lo AND hi`` (the span PostgreSQL
    reads, NOTE [bulk result writes] in app/jobs/store_pg.py) and, only where the indices
    leave gaps in it, ``idx IN (...)``.

    NOTE [runs of indices]: a chunk is almost always a run of consecutive tasks (one batch
    key, cut in task order), and there the IN list says nothing the range does not. It cost
    most of a chunk's store time: a statement with over 50 parameters is one psycopg
    neither caches the parsing of nor prepares (`MAX_CACHED_STATEMENT_PARAMS`), and
    SQLAlchemy renders its expanding IN anew each time."""
    lo, hi = min(idxs), max(idxs)
    terms: list[ColumnElement[bool]] = [TaskRow.idx.between(lo, hi)]
    if len(set(idxs)) != hi - lo + 1:
        terms.append(TaskRow.idx.in_(sorted(set(idxs))))
    return terms
