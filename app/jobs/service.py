"""What the job routes do between HTTP and the store: check, decode, store, render.

At submit, everything that concerns the whole job is checked and answered for the whole
job: an expression that does not compile (400), an unknown model (404), a task with both
or neither of expression and model, a bad dtype or device (422), too many tasks (413).
Each task's tensors are decoded (as /jvp decodes them) and stored as safetensors; a task
whose tensors do not decode is stored as failed with that error, and the job goes on.
Names and shapes are checked when the task runs, by `JVPService.prepare`, like /jvp.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from datetime import datetime
from typing import Any

import orjson
import torch

from app.engine.devices import parse_device, parse_dtype
from app.engine.errors import EngineError, InvalidRequest, TooLarge
from app.jobs import blobs
from app.jobs.backend import JobBackend
from app.jobs.events import RECHECK_S
from app.jobs.execute import error_of
from app.jobs.operations import cotangent_group, task_options
from app.jobs.schemas import JobCreate, JobOptions, JobTask
from app.jobs.solve_tasks import progress, rhs_group
from app.jobs.store import ACTIVE, JobStore, JobView, NewJob, NewTask, StoredTask, now
from app.models.registry import ModelRegistry
from app.services.jvp import JVPService, expression_target
from app.wire.codec import RawTensor, decode_stored, encode_tensor


def job_sha256(body: JobCreate) -> str:
    """The digest an Idempotency-Key is bound to: of the parsed job in one canonical JSON
    spelling (every field, defaults included, keys sorted, no spaces), so the same job sent
    again with other whitespace, key order or omitted defaults is the same job."""
    canonical = orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def batch_key(
    expression: str | None, model: str | None, options: dict[str, Any], inputs: bytes
) -> str:
    """Tasks with one key compute the same function with the same options on tensors of the
    same names, dtypes and shapes: the Celery backend sends them in chunks, to batch."""
    options_json = json.dumps(options, sort_keys=True)
    return _batch_key(expression or "", model or "", options_json, blobs.header(inputs))


@functools.lru_cache(maxsize=1024)  # a job's tasks mostly share one key: hashed once
def _batch_key(expression: str, model: str, options_json: str, header: bytes) -> str:
    digest = hashlib.sha256()
    for part in (expression, model, options_json):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(header)
    return digest.hexdigest()[:32]


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


def _progress(job: JobView) -> dict[str, int]:
    """Newton iterations of the job's running solve tasks: those a Celery worker wrote to
    the store, and those computing in this process (the local runner)."""
    return {**{str(i): n for i, n in job.progress.items()}, **(progress(job.id) or {})}


def job_body(job: JobView) -> dict[str, Any]:
    """The `Job` of the API."""
    return {
        "id": job.id,
        "status": job.status,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "cancelled": job.cancelled,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "eta_s": job.eta_s(now()),
        **({"progress": found} if (found := _progress(job)) else {}),
    }


class JobService:
    def __init__(self, jvp: JVPService, store: JobStore, backend: JobBackend) -> None:
        self.jvp = jvp
        self.store = store
        self.backend = backend

    @property
    def registry(self) -> ModelRegistry:
        return self.jvp.registry

    # -- submit --------------------------------------------------------------------------

    def create(self, body: JobCreate, *, idempotency_key: str | None) -> tuple[JobView, bool]:
        """Check, decode and store a job (blocking: run it in a thread)."""
        limit = self.jvp.settings.max_job_tasks
        if len(body.tasks) > limit:
            raise TooLarge(
                f"The job has {len(body.tasks)} tasks; the limit is {limit} "
                "(JVP_MAX_JOB_TASKS): split it into several jobs",
                param="tasks",
            )
        if body.expression is not None and body.model is not None:
            raise InvalidRequest(
                "Give at most one of 'expression' or 'model' for the job", param="model"
            )
        job_options = body.options.model_dump(exclude_none=True)
        checked: set[tuple[str, str]] = set()
        tasks = []
        for i, task in enumerate(body.tasks):
            expression, model = self._function(body, task, i, checked)
            options = {**job_options, **task.options.model_dump(exclude_none=True)}
            if (task.operation or body.operation) == "solve":
                options.setdefault("dtype", "float64")  # /solve's default
            dtype = self._check_options(options, task.options, i, checked)
            new = NewTask(idx=i)
            if (expression, model) != (body.expression, body.model):
                new.expression, new.model = expression, model
            new.options = task.options.model_dump(exclude_none=True) or None
            single = expression is not None or self.registry.get(str(model)).target.single_output
            extra = task_options(task, body.operation, single)  # "operation": "vjp"
            if extra:
                new.options = {**(new.options or {}), **extra}
                options = {**options, **extra}
            try:
                new.inputs = self._encode_inputs(
                    task, dtype, form=extra.get("cotangents"), rhs=extra.get("rhs")
                )
                new.batch_key = batch_key(expression, model, options, new.inputs)
            except EngineError as e:
                new.error = error_of(e)
            tasks.append(new)
        job = NewJob(
            expression=body.expression,
            model=body.model,
            options=job_options,
            tasks=tasks,
            idempotency_key=idempotency_key,
            body_sha256=None if idempotency_key is None else job_sha256(body),
        )
        return self.store.create_job(job)

    def _function(
        self, body: JobCreate, task: JobTask, i: int, checked: set[tuple[str, str]]
    ) -> tuple[str | None, str | None]:
        """The task's expression or model (its own, else the job's), checked once each."""
        if task.expression is not None and task.model is not None:
            raise InvalidRequest(
                f"Task {i} gives both 'expression' and 'model'; give one",
                param=f"tasks[{i}].model",
            )
        if task.expression is not None or task.model is not None:
            expression, model = task.expression, task.model
            where = f"tasks[{i}]."
        else:
            expression, model = body.expression, body.model
            where = ""
        if expression is None and model is None:
            raise InvalidRequest(
                f"Task {i} has no 'expression' or 'model', and the job gives none",
                param=f"tasks[{i}].expression",
            )
        key = ("expression", expression) if expression is not None else ("model", str(model))
        if key not in checked:
            try:
                if expression is not None:
                    s = self.jvp.settings
                    expression_target(
                        expression,
                        s.max_expression_length,
                        s.max_expression_nodes,
                        s.max_expression_depth,
                    )
                else:
                    self.registry.get(str(model))
            except EngineError as e:
                e.param = f"{where}{key[0]}" if e.param in (None, key[0]) else e.param
                raise
            checked.add(key)
        return expression, model

    def _check_options(
        self, options: dict[str, Any], own: JobOptions, i: int, checked: set[tuple[str, str]]
    ) -> torch.dtype:
        """The task's dtype; a dtype or device this service cannot use fails the whole job."""
        dtype_where = f"tasks[{i}]." if own.dtype is not None else ""
        dtype = parse_dtype(options.get("dtype", "float32"), param=f"{dtype_where}options.dtype")
        device = options.get("device", "auto")
        if ("device", device) not in checked:
            try:
                parse_device(device, self.jvp.engine.devices)
            except EngineError as e:
                e.param = f"tasks[{i}].options.device" if own.device is not None else e.param
                raise
            checked.add(("device", device))
        return dtype

    def _encode_inputs(
        self, task: JobTask, dtype: torch.dtype, *, form: Any = None, rhs: Any = None
    ) -> bytes:
        """``form``: a vjp task's cotangent form (`app.jobs.operations.task_options`);
        ``rhs``: a solve task's (`app.jobs.solve_tasks.solve_options`)."""
        groups: dict[str, dict[str, torch.Tensor | RawTensor]] = {}
        extra = {"cotangents": cotangent_group(task, form)} if form is not None else {}
        if rhs is not None:
            extra["rhs"] = rhs_group(task, rhs)
        for group in (*blobs.GROUPS, *extra):
            given: dict[str, Any] = extra[group] if group in extra else getattr(task, group)
            groups[group] = {
                name: decode_stored(
                    value,
                    param=f"{group}.{name}",
                    default_dtype=dtype,
                    limits=self.jvp.limits,
                )
                for name, value in given.items()
            }
        return blobs.dump_inputs(groups)

    # -- read ----------------------------------------------------------------------------

    async def job(self, job_id: str, *, wait_s: float = 0.0) -> JobView:
        """The job; with `wait_s`, once it has finished or after `wait_s` seconds, whichever
        comes first (NOTE [finished-job events]: woken by the store's events, and reading
        the job again every RECHECK_S whatever it heard)."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(woken.set)

        unsubscribe = self.store.events.subscribe(job_id, wake)  # before the first read
        try:
            deadline = loop.time() + wait_s
            view = await asyncio.to_thread(self.store.get_job, job_id)
            while view.status in ACTIVE and (left := deadline - loop.time()) > 0:
                try:
                    await asyncio.wait_for(woken.wait(), min(left, RECHECK_S))
                except TimeoutError:
                    pass
                woken.clear()
                view = await asyncio.to_thread(self.store.get_job, job_id)
            return view
        finally:
            unsubscribe()

    def results(self, job_id: str, *, offset: int, limit: int) -> dict[str, Any]:
        job, tasks = self.store.results(job_id, offset=offset, limit=limit)
        end = offset + limit
        return {
            "results": [self._render(t) for t in tasks],
            "next_offset": end if end < job.total else None,
        }

    @staticmethod
    def _render(task: StoredTask) -> dict[str, Any]:
        if task.status == "cancelled":
            return {
                "index": task.idx,
                "error": {
                    "type": "cancelled",
                    "message": "The job was cancelled before this task ran",
                    "param": None,
                },
            }
        if task.result is None:
            type_, message, param = task.error or ("internal_error", "No result stored", None)
            return {"index": task.idx, "error": {"type": type_, "message": message, "param": param}}
        stored = blobs.load_result(task.result)
        outputs = [encode_tensor(o, encoding=task.encoding) for o in stored.outputs]
        jvps = [encode_tensor(j, encoding=task.encoding) for j in stored.jvps]
        if stored.solve is not None:  # a solve task
            return {
                "index": task.idx,
                "output": outputs[0] if stored.single else outputs,
                "solution": dict(zip(stored.names or [], jvps, strict=True)),
                "solve": stored.solve,
            }
        if stored.names is not None:  # a vjp task
            return {
                "index": task.idx,
                "output": outputs[0] if stored.single else outputs,
                "vjp": dict(zip(stored.names, jvps, strict=True)),
            }
        return {
            "index": task.idx,
            "output": outputs[0] if stored.single else outputs,
            "jvp": jvps[0] if stored.single else jvps,
        }

    async def stop(self) -> None:
        """Stop the backend (unfinished tasks stay queued), then close the store."""
        try:
            await self.backend.stop()
        finally:
            self.store.close()
