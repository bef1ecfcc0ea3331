"""One stored task, executed the same way by the local runner (app/jobs/runner.py) and by a
Celery worker (app/jobs/celery_app.py): the /jvp request it stands for, prepared exactly
as /jvp would, and its end (a result or an error, as /jvp would answer it) as the outcome
the store records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.engine.errors import EngineError
from app.engine.task import JVPResult, JVPTask
from app.jobs import blobs
from app.jobs.operations import VJP_KEYS, is_vjp, vjp_task
from app.jobs.solve_tasks import SOLVE_KEYS, finished, is_solve, solve_task
from app.jobs.store import Outcome, TaskSpec
from app.jobs.tables import DONE
from app.schemas import JVPOptions, JVPRequest
from app.services.jvp import JVPService

log = logging.getLogger(__name__)

Error = tuple[str, str, str | None]


def error_of(exc: BaseException) -> tuple[str, str, str | None]:
    """(type, message, param) of a task's error, as /jvp would answer it."""
    if isinstance(exc, EngineError):
        return exc.type, exc.message, exc.param
    return "internal_error", f"Internal error computing this task: {type(exc).__name__}", None


def request_of(spec: TaskSpec) -> JVPRequest:
    """The /jvp request a stored task stands for, its tensors as stored (checked against the
    limits when the job was submitted): `JVPService.prepare` takes tensors as they are, as
    from a safetensors body, so none is encoded again only to be decoded."""
    groups = blobs.load_inputs(spec.inputs)
    kept = (*VJP_KEYS, *SOLVE_KEYS)
    options = {k: v for k, v in spec.options.items() if v is not None and k not in kept}
    return JVPRequest(
        expression=spec.expression,
        model=spec.model,
        primals=groups["primals"],
        tangents=groups["tangents"],
        parameter_tangents=groups["parameter_tangents"],
        options=JVPOptions(**options),
    )


@dataclass
class Finished:
    """A task that ended; its result is serialized with the write (`outcome`)."""

    spec: TaskSpec
    kind: str
    task: JVPTask | None = None
    result: JVPResult | None = None
    error: tuple[str, str, str | None] | None = None

    def outcome(self) -> Outcome:
        finished(self.spec)  # a solve task's progress ends with it
        blob = None
        if self.kind == DONE:
            assert self.task is not None and self.result is not None
            single = self.task.target.single_output and len(self.result.outputs) == 1
            blob = blobs.dump_result(
                self.result.outputs,
                self.result.jvps,
                single=single,
                method=self.result.method,
                names=getattr(self.task.operation, "names", None),  # a vjp task's
                solve=self.task.operation.report() if is_solve(self.spec) else None,  # type: ignore[union-attr]
            )
        return Outcome(self.spec.job_id, self.spec.idx, self.kind, result=blob, error=self.error)


def task_error(spec: TaskSpec, exc: BaseException, *, traceback: bool = False) -> Error:
    """The stored error of a task that raised ``exc``; one that is not the engine's own is
    logged (with its traceback when ``traceback``), since it is a bug, not bad input."""
    if not isinstance(exc, EngineError):
        if traceback:
            log.error("jobs: task %s/%d failed unexpectedly", spec.job_id, spec.idx, exc_info=exc)
        else:
            log.error("jobs: task %s/%d failed unexpectedly: %r", spec.job_id, spec.idx, exc)
    return error_of(exc)


def prepare(service: JVPService, spec: TaskSpec) -> tuple[JVPTask | None, Error | None]:
    """The task's work item, prepared as its route (/jvp, or /vjp for a vjp task) would; or,
    when that fails, its error (the task fails, the job goes on)."""
    try:
        if is_vjp(spec):
            return vjp_task(service, spec), None
        if is_solve(spec):
            return solve_task(service, spec), None
        return service.prepare(request_of(spec)), None
    except Exception as e:  # noqa: BLE001 - recorded for the task; the job goes on
        return None, task_error(spec, e, traceback=True)
