"""Celery on the broker (RabbitMQ, or Redis): the app, its delivery settings, and the task
that computes a chunk.

The broker carries ids only: a message is ``(job_id, [[start, stop], ...])``, index ranges
of one job's tasks. Inputs and results live in the job store (PostgreSQL), so a message
is small and a result is written where every API replica reads it.

# NOTE [celery delivery]
- ``acks_late``: a chunk's message is acknowledged after its results are committed, so a
  worker that dies mid-chunk leaves it unacknowledged. ``task_reject_on_worker_lost``:
  when the pool child computing it dies (SIGKILL, the OOM killer, a segfault), the
  worker's parent puts the message back in the queue at once. When the whole worker
  dies, RabbitMQ requeues the message as its connection closes; Redis only once
  ``visibility_timeout`` (JVP_CELERY_VISIBILITY_TIMEOUT_S) has passed, which must be
  longer than the longest chunk (JVP_CELERY_TASK_TIMEOUT_S), or a healthy slow chunk
  would be handed out twice. Either way the chunk's tasks are held under a lease that
  the worker renews while it computes; what the broker misses (a stopped worker, a lost
  machine, an hour of visibility timeout), the lease catches within JVP_CELERY_LEASE_S
  (NOTE [task leases] in app/jobs/leases.py).
- ``worker_prefetch_multiplier=1``: a worker reserves one chunk per pool slot, so the
  other workers get the rest of the queue.
- Each start of a task is counted in its row (`JobStore.start_attempt`) and committed
  before anything is computed. A task that already started JVP_MAX_TASK_ATTEMPTS times
  and never ended (it keeps taking its worker down) is recorded as failed, "Worker lost
  N times ...", and not computed again.
- Results are written with `JobStore.record(worker=...)`, which writes a task only while
  it has not ended and this worker holds it: a chunk delivered twice writes and counts
  each task once, and a worker that lost its tasks writes none of them.
- The pool is prefork with one child per slot (--concurrency, 1 by default). The child
  owns the device workers (an `Engine`, built and warmed up as the child starts, before it
  takes a chunk; nothing touches CUDA before the fork): the task body
  prepares each task as /jvp would; a chunk of tiny elementwise tasks computes as one
  stacked JVP in the task's thread (NOTE [stacking tiny expressions]: 125 tasks of
  `sin(x) * y + x**2` on 64 elements had cost 125 forward-AD calls, each handed to the
  device worker's thread and back, a third of the worker's time); any other chunk goes
  to the engine at once (so the device worker's dynamic batcher stacks compatible
  tasks), and the task waits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from celery import Task
from celery.signals import worker_process_init

from app.jobs.celery_config import make_celery
from app.settings import Settings

if TYPE_CHECKING:
    from app.engine.task import JVPResult, JVPTask
    from app.jobs.execute import Finished
    from app.jobs.store import TaskSpec
    from app.services.jvp import JVPService

log = logging.getLogger("app.jobs.celery")


def lost_error(attempts: int, limit: int) -> tuple[str, str, None]:
    return (
        "internal_error",
        f"Worker lost {attempts} times while computing this task (killed or crashed; "
        f"JVP_MAX_TASK_ATTEMPTS={limit}): it is not retried again. A task that takes its "
        "worker down may need more memory than the worker has.",
        None,
    )


class WorkerRuntime:
    """What one worker process (a pool child) holds: settings, the store, and the engine,
    built at the first chunk and kept for the life of the process."""

    def __init__(self, settings: Settings) -> None:
        from app.jobs.store import JobStore

        self.settings = settings
        self.pid = os.getpid()
        self.worker_id = f"{socket.gethostname()}:{self.pid}"
        self.store = JobStore(settings.database_url)
        self._service: JVPService | None = None
        self._lock = threading.Lock()

    def service(self) -> JVPService:
        with self._lock:
            if self._service is None:
                self._service = self._build()
            return self._service

    def _build(self) -> JVPService:
        from app.runtime import build  # imports torch and the models: in the pool child

        built = build(self.settings, plan_cpu=False)
        built.start_engine()
        log.info(
            "worker %s: engine ready on %s",
            self.worker_id,
            ", ".join(str(d) for d in built.engine.devices),
        )
        return built.services.jvp

    def compute(self, specs: list[TaskSpec]) -> list[Finished]:
        """Prepare each task as /jvp would; a chunk of tiny tasks of one work computes as
        one stacked JVP here (`Engine.run_together`), any other is submitted whole to the
        engine at BATCH priority (so the dynamic batcher can stack it) and waited for, at
        most the task timeout."""
        from app.jobs.execute import Finished, prepare
        from app.jobs.tables import DONE, FAILED

        service = self.service()
        finished: list[Finished] = []
        prepared: list[tuple[TaskSpec, JVPTask]] = []
        for spec in specs:
            task, error = prepare(service, spec)
            if task is None:
                finished.append(Finished(spec, FAILED, error=error))
            else:
                prepared.append((spec, task))
        together = service.engine.run_together([task for _, task in prepared])
        if together is None:
            return finished + self._submit_and_wait(service, prepared)
        pairs = zip(prepared, together, strict=True)
        return finished + [Finished(s, DONE, task=t, result=r) for (s, t), r in pairs]

    def _submit_and_wait(
        self, service: JVPService, prepared: list[tuple[TaskSpec, JVPTask]]
    ) -> list[Finished]:
        from app.engine.errors import DeadlineExceeded
        from app.engine.task import BATCH
        from app.jobs.execute import Finished, task_error
        from app.jobs.tables import DONE, FAILED

        finished: list[Finished] = []
        submitted: list[tuple[TaskSpec, JVPTask, Future[JVPResult]]] = []
        for spec, task in prepared:
            try:
                future = service.engine.submit(task, priority=BATCH)
            except Exception as e:  # noqa: BLE001 - recorded for the task; the job goes on
                finished.append(Finished(spec, FAILED, error=task_error(spec, e, traceback=True)))
                continue
            submitted.append((spec, task, future))
        timeout = self.settings.celery_task_timeout_s
        deadline = time.monotonic() + timeout
        for spec, task, future in submitted:
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                future.cancel()
                late = DeadlineExceeded(f"The task did not finish within {timeout:g} s")
                finished.append(Finished(spec, FAILED, error=task_error(spec, late)))
            except Exception as e:  # noqa: BLE001 - the task's own error
                finished.append(Finished(spec, FAILED, error=task_error(spec, e)))
            else:
                finished.append(Finished(spec, DONE, task=task, result=result))
        return finished


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()
_settings: Settings | None = None  # the worker's (`worker_main`), inherited by its pool children


def runtime() -> WorkerRuntime:
    """This process's runtime (a forked child never reuses its parent's)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            if _settings is None:
                raise RuntimeError("worker_main sets the worker's settings before any chunk")
            _runtime = WorkerRuntime(_settings)
        return _runtime


def run_chunk(self: Task, job_id: str, ranges: list[list[int]]) -> dict[str, int]:
    """Compute the tasks of `ranges` of job `job_id` that have not ended (NOTE [celery
    delivery]); returns counts for the worker log."""
    from app.jobs.leases import LeaseKeeper, local_worker_dead
    from app.jobs.solve_tasks import PROGRESS
    from app.jobs.store import Outcome
    from app.jobs.tables import CANCELLED, FAILED

    rt = runtime()
    limit = rt.settings.max_task_attempts
    lease_s = rt.settings.celery_lease_s
    idxs = [i for start, stop in ranges for i in range(start, stop)]
    attempt = rt.store.start_attempt(
        job_id,
        idxs,
        worker=rt.worker_id,
        max_attempts=limit,
        lease_s=lease_s,
        is_dead=local_worker_dead,
    )
    ended = [Outcome(job_id, i, FAILED, error=lost_error(n, limit)) for i, n in attempt.lost]
    ended += [Outcome(job_id, i, CANCELLED) for i in attempt.cancelled]
    if attempt.lost:
        log.error(
            "jobs: %d task(s) of job %s lost their worker %d times: recorded as failed",
            len(attempt.lost),
            job_id,
            limit,
        )
    rt.store.record(ended)
    if attempt.run:
        held = [spec.idx for spec in attempt.run]

        def solving(idx: int) -> int | None:  # NOTE [progress across processes]
            return PROGRESS.get((job_id, idx))

        with LeaseKeeper(
            rt.store, job_id, held, worker=rt.worker_id, lease_s=lease_s, progress=solving
        ):
            if rt.settings.celery_task_delay_s:
                time.sleep(rt.settings.celery_task_delay_s)  # test hook (JVP_CELERY_TASK_DELAY_S)
            finished = rt.compute(attempt.run)
            rt.store.record([f.outcome() for f in finished], worker=rt.worker_id)
    counts = {
        "computed": len(attempt.run),
        "lost": len(attempt.lost),
        "cancelled": len(attempt.cancelled),
    }
    log.info(
        "jobs: worker %s computed %d task(s) of job %s %s",
        rt.worker_id,
        len(attempt.run),
        job_id,
        ranges,
    )
    return counts


def ping_local_workers(settings: Settings, timeout_s: float = 5.0) -> list[str]:
    """Names of the Celery workers on this host that answer a ping (a container's healthcheck)."""
    app = make_celery(settings)
    host = socket.gethostname()
    replies = app.control.ping(timeout=timeout_s) or []
    return sorted(name for reply in replies for name in reply if name.endswith(f"@{host}"))


def worker_main(settings: Settings, device: str | None, concurrency: int, log_level: str) -> int:
    """`jvp-service worker`: a Celery worker that owns the device workers of its machine.

    With --device (or JVP_DEVICE other than auto) one worker process computes on those
    devices. Without, one worker process per GPU (each `--device cuda:N`, each its own
    Celery worker, supervised here), or one on the CPU when there is none. A worker
    process never touches CUDA before its pool forks (a forked child could not use it):
    GPUs are counted through NVML, and GPU workers run as fresh processes."""
    global _settings
    if device is None and settings.device == "auto":
        gpus = _gpu_count()
        if gpus:
            return _supervise([f"cuda:{i}" for i in range(gpus)], concurrency, log_level)
        device = "cpu"
    devices = device or settings.device
    if device is not None and device != "cpu":
        devices = f"{device},cpu"  # tasks may still ask for the CPU
    # What the pool children (forked from this process) serve with.
    settings = _settings = settings.model_copy(update={"device": devices})
    from app.jobs.store import JobStore

    store = JobStore(settings.database_url)  # tables at head before the first chunk
    try:
        store.migrate()
    finally:
        store.close()
    app = make_celery(settings, run_chunk)
    # Each pool child builds its engine (warm-up, models) before it takes a chunk.
    app.conf.worker_proc_alive_timeout = 300
    worker_process_init.connect(_warm_child, weak=False)
    tag = (device or "devices").replace(":", "").replace(",", "-")
    log.info(
        "worker: queue %r on %s, devices %s, concurrency %d",
        settings.celery_queue,
        _redacted(settings.broker_url),
        devices,
        concurrency,
    )
    app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            "--pool=prefork",
            f"--loglevel={log_level.upper()}",
            f"--queues={settings.celery_queue}",
            f"--hostname=jvp-{tag}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _warm_child(**_: object) -> None:
    runtime().service()


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a log line
        return "the broker"


def _gpu_count() -> int:
    # NVML answers without initialising CUDA in this process (which forks its pool).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _supervise(devices: list[str], concurrency: int, log_level: str) -> int:
    """One `jvp-service worker --device D` process per device; SIGTERM/SIGINT are passed on
    (a warm shutdown: chunks computing finish). Exits when they all have."""
    import signal
    import subprocess
    import sys

    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "worker",
                "--device",
                d,
                "--concurrency",
                str(concurrency),
                "--log-level",
                log_level,
            ]
        )
        for d in devices
    ]

    def forward(signum: int, _: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("worker: one process per GPU: %s", ", ".join(devices))
    return max(child.wait() for child in children)


__all__ = ["WorkerRuntime", "run_chunk", "worker_main"]
