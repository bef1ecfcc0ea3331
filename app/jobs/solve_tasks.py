"""Job tasks with ``"operation": "solve"``: a POST /solve body as a task (API.md "POST
/solve", "In a batch job").

A solve task is stored like a vjp task (app/jobs/operations.py): its primals in the inputs
blob, its ``rhs`` there too (group ``rhs``, one tensor per output by index), and in its
options ``operation``, ``unknowns``, ``method`` and ``solve_options`` (the /solve options
other than dtype, device and encoding, which are the task's options as for any task).
When it runs it is prepared exactly as POST /solve prepares a request
(`SolveService.prepare`), except that it is bounded by one product, not by the iteration
caps and the request deadline: a job is where a solve that may run long goes (NOTE [the
cost of a solve] in app/services/solve.py). Its result is stored with the unknowns' names
and the solve's report (converged, iterations, counts, history), rendered as /solve's body.

While it runs, the job's status has ``progress``: ``{"<task index>": Newton iterations
done}`` for each solve task computing: from `PROGRESS` for those computing in this process
(the local runner), from the store for those a Celery worker computes, whose lease keeper
writes this process's `PROGRESS` there (NOTE [progress across processes] in
app/jobs/leases.py).
"""

from __future__ import annotations

from typing import Any

from app.engine.task import JVPTask
from app.jobs import blobs
from app.jobs.store import TaskSpec
from app.schemas_solve import SolveOptions, SolveRequest
from app.services.jvp import JVPService
from app.services.solve import SolveService

# (job id, task index) -> iterations done, of the solve tasks computing in this process:
# written by the device worker (one int per iteration), read by GET /jobs/{id}.
PROGRESS: dict[tuple[str, int], int] = {}

# Option keys a solve task keeps in its stored options (never passed to JVPOptions).
SOLVE_KEYS = ("unknowns", "method", "solve_options", "rhs")
_TASK_OPTIONS = ("dtype", "device", "encoding")  # the task's own, shared with jvp tasks


def solve_options(task: Any) -> dict[str, Any]:
    """The stored options of a solve task (``rhs``: "one" tensor, a count, or None)."""
    rhs = task.rhs
    form = None if rhs is None else (len(rhs) if isinstance(rhs, list) else "one")
    return {
        "operation": "solve",
        "unknowns": list(task.unknowns or []),
        "method": task.method or "newton_krylov",
        "solve_options": (task.solve_options or {}),
        "rhs": form,
    }


def rhs_group(task: Any, form: Any) -> dict[str, Any]:
    """The task's rhs by index, as wire tensors."""
    if form is None:
        return {}
    given = [task.rhs] if form == "one" else task.rhs
    return {str(i): r for i, r in enumerate(given)}


def is_solve(spec: TaskSpec) -> bool:
    return bool(spec.options.get("operation") == "solve")


def solve_task(service: JVPService, spec: TaskSpec) -> JVPTask:
    """A claimed solve task, prepared as POST /solve prepares a request."""
    from app.jobs.operations import _wire  # the bit-exact form-3 wire tensor

    options = dict(spec.options)
    groups = blobs.load_inputs(spec.inputs)
    form = options.get("rhs")
    rhs: Any = None
    if form is not None:
        given = groups.get("rhs", {})
        count = 1 if form == "one" else int(form)
        wires = [_wire(given[str(i)]) for i in range(count)]
        rhs = wires[0] if form == "one" else wires
    own = {k: options[k] for k in _TASK_OPTIONS if options.get(k)}
    request = SolveRequest(
        expression=spec.expression,
        model=spec.model,
        primals={n: _wire(t) for n, t in groups["primals"].items()},
        unknowns=options.get("unknowns", []),
        method=options.get("method", "newton_krylov"),
        rhs=rhs,
        options=SolveOptions(**{**options.get("solve_options", {}), **own}),
    )
    task, op = SolveService(service).prepare(request, job=True)
    key = (spec.job_id, spec.idx)
    op.progress = lambda iterations: PROGRESS.__setitem__(key, iterations)
    return task


def finished(spec: TaskSpec) -> None:
    """The task ended: it has no progress any more."""
    PROGRESS.pop((spec.job_id, spec.idx), None)


def progress(job_id: str) -> dict[str, int] | None:
    """``{"<task index>": iterations}`` of the job's solve tasks computing here, or None."""
    found = {str(idx): n for (job, idx), n in list(PROGRESS.items()) if job == job_id}
    return found or None
