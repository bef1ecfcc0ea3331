"""Batch jobs: a durable store (SQLAlchemy + Alembic) and a runner that feeds the device workers.

`start_jobs` opens the store (running its migrations) and starts the backend that runs
tasks; `JobService.stop` stops it, leaving unfinished tasks queued in the store.
"""

from __future__ import annotations

import asyncio

from app.jobs.backend import JobBackend, NoRunner
from app.jobs.runner import LocalRunner
from app.jobs.service import JobService
from app.jobs.store import JobStore
from app.services.jvp import JVPService
from app.settings import Settings


async def start_jobs(settings: Settings, service: JVPService) -> JobService:
    """Open the store at JVP_DATABASE_URL (migrated to the newest revision), start the runner
    (or, with JVP_JOBS_BACKEND=celery, the dispatcher that sends task ids to the broker)."""
    store = JobStore(settings.database_url)
    await asyncio.to_thread(store.migrate)
    store.listen()  # GET /jobs/{id}?wait_s= hears of jobs other processes finish
    backend: JobBackend
    if settings.jobs_backend == "celery":
        from app.jobs.celery_backend import CeleryBackend  # imports celery: only when asked

        backend = CeleryBackend(store, settings)  # this process runs no job runner
    elif settings.job_runner == "local":
        backend = LocalRunner(
            store,
            service,
            concurrency=settings.job_concurrency,
            retention_s=settings.job_retention_s,
        )
    else:
        backend = NoRunner()
    jobs = JobService(service, store, backend)
    await backend.start()
    return jobs


__all__ = ["JobBackend", "JobService", "JobStore", "LocalRunner", "start_jobs"]
