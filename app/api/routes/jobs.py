"""Batch jobs: POST /jobs, GET /jobs, GET /jobs/{id}, GET /jobs/{id}/results, DELETE /jobs/{id}."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from app.api.auth import KeyDep
from app.api.body import JSONBodyRoute
from app.api.deps import JobServiceDep, settings
from app.api.errors import error_responses
from app.api.responses import ORJSONResponse
from app.engine.errors import TooLarge
from app.jobs.schemas import Job, JobCreate, JobList, JobResults, JobStatus
from app.jobs.service import job_body


async def read_body_limited(request: Request, limit: int) -> bytes:
    """Read the body, answering 413 as soon as it passes `limit` bytes (chunked bodies too)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(
            f"The body has {int(declared)} bytes; the limit is {limit} (JVP_MAX_JOB_BODY_BYTES): "
            "split the job, or send tensors as b64",
            param="body",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(
                f"The body has more than {limit} bytes, the limit (JVP_MAX_JOB_BODY_BYTES): "
                "split the job, or send tensors as b64",
                param="body",
            )
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's cache: FastAPI reads it from here
    return request._body


class LimitedBodyRoute(JSONBodyRoute):
    """A route whose body is read with the job body limit, then parsed as every JSON body."""

    async def read_body(self, request: Request) -> bytes:
        return await read_body_limited(request, (await settings(request)).max_job_body_bytes)


# Offsets past this are a 422: offset + limit must fit a database integer (BIGINT, SQLite).
MAX_OFFSET = 2**62

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=LimitedBodyRoute)

ERRORS = error_responses(400, 401, 404, 413, 422)


@router.post(
    "", status_code=202, response_model=Job, responses=error_responses(400, 401, 404, 413, 422, 408)
)
async def create_job(
    body: JobCreate,
    _: KeyDep,
    jobs: JobServiceDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> ORJSONResponse:
    """Submit a batch job: many JVPs sharing job-wide defaults. Answered once it is stored."""
    job, created = await asyncio.to_thread(jobs.create, body, idempotency_key=idempotency_key)
    if created:
        jobs.backend.submit(job.id)
    headers = {"Location": f"/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return ORJSONResponse(job_body(job), status_code=202, headers=headers)


@router.get("", response_model=JobList, responses=ERRORS)
async def list_jobs(
    _: KeyDep,
    jobs: JobServiceDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    status: JobStatus | None = None,
) -> ORJSONResponse:
    """Jobs, newest first, one page (optionally only those of one status)."""
    views = await asyncio.to_thread(jobs.store.list_jobs, offset=offset, limit=limit, status=status)
    next_offset = offset + limit if len(views) == limit else None
    return ORJSONResponse({"jobs": [job_body(v) for v in views], "next_offset": next_offset})


# The longest a GET /jobs/{id} waits for its job to finish (wait_s).
MAX_WAIT_S = 60.0


@router.get("/{job_id}", response_model=Job, responses=ERRORS)
async def read_job(
    job_id: str,
    _: KeyDep,
    jobs: JobServiceDep,
    wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
) -> ORJSONResponse:
    """A job's status and progress (done, failed, total, eta_s). With `wait_s`, answered as
    soon as the job has finished (completed or cancelled), or after `wait_s` seconds with
    its state then: a client waits for a job without polling."""
    return ORJSONResponse(job_body(await jobs.job(job_id, wait_s=wait_s)))


@router.get("/{job_id}/results", response_model=JobResults, responses=ERRORS)
async def read_job_results(
    job_id: str,
    _: KeyDep,
    jobs: JobServiceDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ORJSONResponse:
    """Results of tasks [offset, offset + limit), in task order; a result or an error each."""
    page = await asyncio.to_thread(jobs.results, job_id, offset=offset, limit=limit)
    return ORJSONResponse(page)


@router.delete("/{job_id}", response_model=Job, responses=ERRORS)
async def cancel_job(job_id: str, _: KeyDep, jobs: JobServiceDep) -> ORJSONResponse:
    """Cancel a job: tasks not yet started never run; results already written stay."""
    view = await asyncio.to_thread(jobs.store.get_job, job_id)  # 404 before anything else
    if view.status in ("queued", "running"):
        jobs.backend.cancel(job_id)
        view = await asyncio.to_thread(jobs.store.cancel, job_id)
    return ORJSONResponse(job_body(view))
