"""Bodies of the batch-job routes (API.md "Batch jobs")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import ErrorDetail, Tensor

JobStatus = Literal["queued", "running", "completed", "cancelled"]


class JobOptions(BaseModel):
    """`JVPOptions` with every field optional: a task's options override the job's, field by
    field, and what neither sets takes the /jvp default."""

    model_config = ConfigDict(extra="forbid")

    dtype: str | None = Field(None, description="float16, bfloat16, float32, float64 (or FP16...).")
    device: str | None = Field(None, description="auto | cpu | cuda | cuda:N")
    engine: Literal["dual", "functional"] | None = None
    encoding: Literal["json", "b64"] | None = Field(
        None, description="How GET /jobs/{id}/results writes this task's tensors."
    )
    fallback: Literal["auto", "none"] | None = None


class JobTask(BaseModel):
    """One JVP of a job: a /jvp body whose `expression`/`model`/`options` default to the job's."""

    model_config = ConfigDict(extra="forbid")

    expression: str | None = Field(None, description="Overrides the job's expression.")
    model: str | None = Field(None, description="Overrides the job's model.")
    primals: dict[str, Tensor] = Field(description="One tensor per input, by name.")
    tangents: dict[str, Tensor] = Field(default_factory=dict)
    parameter_tangents: dict[str, Tensor] = Field(default_factory=dict)
    options: JobOptions = Field(default_factory=JobOptions)
    operation: Literal["jvp", "vjp", "solve"] | None = Field(
        None, description="Overrides the job's operation: jvp (default), vjp or solve."
    )
    cotangents: Any = Field(
        None, description='For "operation": "vjp": as in POST /vjp (a list for several outputs).'
    )
    wrt: list[str] | None = Field(None, description='For "vjp": as in POST /vjp.')
    unknowns: list[str] | None = Field(None, description='For "solve": as in POST /solve.')
    method: Literal["newton_krylov", "linear", "least_squares"] | None = Field(
        None, description='For "solve": as in POST /solve (default newton_krylov).'
    )
    rhs: Any = Field(None, description='For "solve" with method linear: as in POST /solve.')
    solve_options: dict[str, Any] | None = Field(
        None,
        description='For "solve": POST /solve\'s options but dtype, device and encoding '
        "(those are the task's options): tol, max_iterations, krylov, krylov_tol, ...",
    )


class JobCreate(BaseModel):
    """`POST /jobs`: job-wide defaults and the tasks."""

    model_config = ConfigDict(extra="forbid")

    expression: str | None = Field(None, description="Every task's expression, unless it has one.")
    model: str | None = Field(None, description="Every task's model, unless it has one.")
    options: JobOptions = Field(default_factory=JobOptions)
    operation: Literal["jvp", "vjp", "solve"] = Field(
        "jvp", description="Every task's operation, unless it has one: jvp, vjp or solve."
    )
    tasks: list[JobTask] = Field(min_length=1, description="The JVPs, in order (index 0, 1, ...).")


class Job(BaseModel):
    id: str
    status: JobStatus
    total: int = Field(description="Tasks in the job.")
    done: int = Field(description="Tasks that ended, with a result or an error.")
    failed: int = Field(description="Tasks that ended in error.")
    cancelled: int = Field(description="Tasks that never ran because the job was cancelled.")
    created_at: str
    updated_at: str
    started_at: str | None = Field(description="When the first task started.")
    finished_at: str | None = Field(description="When the job completed or was cancelled.")
    eta_s: float | None = Field(
        description="Seconds until the job completes at its rate so far (null before a rate is "
        "known, 0 once finished)."
    )
    progress: dict[str, int] | None = Field(
        None,
        description='{"<task index>": Newton iterations done} of the "solve" tasks computing '
        "now (a Celery worker's reach the store about once a second); absent when there are "
        "none.",
    )


class JobList(BaseModel):
    jobs: list[Job]
    next_offset: int | None


class TaskResult(BaseModel):
    index: int
    output: Any = Field(None, description="A tensor, or a list of tensors for several outputs.")
    jvp: Any = None
    vjp: Any = Field(None, description='For a "vjp" task: {"<name>": Jᵀu}.')
    solution: Any = Field(None, description='For a "solve" task: {"<unknown>": T}.')
    solve: dict[str, Any] | None = Field(
        None,
        description='For a "solve" task: the rest of POST /solve\'s body (residual_norm, '
        "converged, iterations, jvp_count, vjp_count, history, reason).",
    )
    error: ErrorDetail | None = None


class JobResults(BaseModel):
    results: list[TaskResult] = Field(
        description="The tasks of [offset, offset + limit) that have ended, in task order "
        "(a task still queued or running is left out)."
    )
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")
