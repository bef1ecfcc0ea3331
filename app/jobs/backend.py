"""What runs a job's tasks, behind one small interface.

The API stores a job (app/jobs/store.py) and then tells the backend; the backend takes
tasks from the store, computes them, and writes their outcomes back. `LocalRunner`
(app/jobs/runner.py) does it in the service process on its device workers. A backend
for workers on other machines (Celery on RabbitMQ or Redis, with PostgreSQL as the store) implements
the same four methods: `submit` would enqueue the job's task ids, `cancel` revoke them.
"""

from __future__ import annotations

from typing import Protocol


class JobBackend(Protocol):
    async def start(self) -> None:
        """Take up every queued or interrupted task of the store."""

    async def stop(self) -> None:
        """Stop taking tasks; tasks not finished stay queued in the store."""

    def submit(self, job_id: str) -> None:
        """A job was stored (committed): its tasks may run."""

    def cancel(self, job_id: str) -> None:
        """A job is being cancelled: tasks of it not started must never run."""


class NoRunner:
    """`JVP_JOB_RUNNER=off`: jobs are stored; another process runs them."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def submit(self, job_id: str) -> None:
        return None

    def cancel(self, job_id: str) -> None:
        return None
