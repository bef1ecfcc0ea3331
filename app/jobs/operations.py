"""Job tasks beyond /jvp: ``"operation": "vjp"`` (API.md "Additions (v1.1)").

A vjp task is stored like a jvp task: its primals in the inputs blob, its cotangents there
too (group ``cotangents``, one tensor per output by index, a null one left out), and in
its options ``operation``, ``wrt`` and ``cotangents`` (how many there are, or "one" for a
single tensor). When it runs it is prepared exactly as POST /vjp prepares a request
(`VJPService.prepare`); its result is stored with the names of its ``vjp`` entries.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from app.engine.devices import DTYPE_NAMES
from app.engine.task import JVPTask
from app.jobs import blobs
from app.jobs.store import TaskSpec
from app.schemas_vjp import VJPOptions, VJPRequest
from app.services.jvp import JVPService
from app.services.vjp import VJPService

# Option keys a vjp task keeps in its stored options (never passed to JVPOptions).
VJP_KEYS = ("operation", "wrt", "cotangents")


def task_options(task: Any, job_operation: str, single: bool) -> dict[str, Any]:
    """The stored options a task adds for its operation ({} for a jvp task); ``single``:
    the function has one output, so its cotangent is one tensor (a nested list is one)."""
    operation = task.operation or job_operation
    if operation == "solve":
        from app.jobs.solve_tasks import solve_options

        return solve_options(task)
    if operation != "vjp":
        return {}
    form = "one" if single or not isinstance(task.cotangents, list) else len(task.cotangents)
    return {"operation": "vjp", "wrt": task.wrt, "cotangents": form}


def cotangent_group(task: Any, form: Any) -> dict[str, Any]:
    """The task's cotangents by index, as wire tensors (nulls left out)."""
    given = [task.cotangents] if form == "one" else task.cotangents
    return {str(i): c for i, c in enumerate(given) if c is not None}


def is_vjp(spec: TaskSpec) -> bool:
    return bool(spec.options.get("operation", "jvp") == "vjp")


def _wire(t: torch.Tensor) -> dict[str, Any]:
    """A stored tensor as a form-3 wire tensor, which /vjp's decoder reads back bit for bit."""
    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return {
        "shape": list(t.shape),
        "dtype": DTYPE_NAMES[t.dtype],
        "b64": base64.b64encode(raw.numpy().tobytes()).decode(),
    }


def vjp_task(service: JVPService, spec: TaskSpec) -> JVPTask:
    """A claimed vjp task, prepared as POST /vjp prepares a request."""
    options = dict(spec.options)
    groups = blobs.load_inputs(spec.inputs)
    given: dict[str, torch.Tensor] = groups.get("cotangents", {})
    form = options.get("cotangents", "one")
    count = 1 if form == "one" else int(form)
    wires = [_wire(given[str(i)]) if str(i) in given else None for i in range(count)]
    request = VJPRequest(
        expression=spec.expression,
        model=spec.model,
        primals={n: _wire(t) for n, t in groups["primals"].items()},
        cotangents=wires[0] if form == "one" else wires,
        wrt=options.get("wrt"),
        options=VJPOptions(
            **{k: options[k] for k in ("dtype", "device", "encoding") if options.get(k)}
        ),
    )
    task, _, _ = VJPService(service).prepare(request)
    return task
