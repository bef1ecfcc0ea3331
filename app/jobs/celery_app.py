"""Celery on a Redis broker: the app, its delivery settings, and the task that computes a chunk.

The broker carries ids only: a message is ``(job_id, [[start, stop], ...])``, index ranges
of one job's tasks. Inputs and results live in the job store (PostgreSQL), so a message
is small and a result is written where every API replica reads it.

# NOTE [celery delivery]
- ``acks_late``: a chunk's message is acknowledged after its results are committed, so a
  worker that dies mid-chunk leaves it unacknowledged. ``task_reject_on_worker_lost``:
  when the pool child computing it dies (SIGKILL, the OOM killer, a segfault), the
  worker's parent puts the message back in the queue at once. When the whole worker
  dies, Redis hands the message to another worker once ``visibility_timeout``
  (JVP_CELERY_VISIBILITY_TIMEOUT_S) has passed; it must be longer than the longest
  chunk (JVP_CELERY_TASK_TIMEOUT_S), or a healthy slow chunk would be handed out twice.
- ``worker_prefetch_multiplier=1``: a worker reserves one chunk per pool slot, so the
  other workers get the rest of the queue.
- Each start of a task is counted in its row (`JobStore.start_attempt`) and committed
  before anything is computed. A task that already started JVP_MAX_TASK_ATTEMPTS times
  and never ended (it keeps taking its worker down) is recorded as failed, "Worker lost
  N times ...", and not computed again.
- Results are written with `JobStore.record`, which writes a task only while it has not
  ended: a chunk delivered twice writes and counts each task once.
- The pool is prefork with one child per slot (--concurrency, 1 by default). The child
  owns the device workers (an `Engine`, built and warmed up as the child starts, before it
  takes a chunk; nothing touches CUDA before the fork): the task body
  prepares each task as /jvp would, submits the whole chunk to the engine at once (so
  the device worker's dynamic batcher stacks compatible tasks), and waits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from app.settings import Settings

if TYPE_CHECKING:
    from app.engine.worker import JVPResult, JVPTask
    from app.jobs.runner import _Finished
    from app.jobs.store import TaskSpec
    from app.service import JVPService

log = logging.getLogger("app.jobs.celery")

TASK_NAME = "jvp.run_chunk"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options: the visibility timeout, and a restore sweep frequent enough
    to honour it (kombu's default sweeps about every 100 s)."""
    visibility = settings.celery_visibility_timeout_s
    return {
        "visibility_timeout": visibility,
        "unacked_restore_interval": max(1.0, min(10.0, visibility / 4)),
        "unacked_restore_throttle": 1,
    }


def make_celery(settings: Settings) -> Celery:
    """The Celery app of these settings, with the chunk task registered."""
    if settings.celery_visibility_timeout_s <= settings.celery_task_timeout_s:
        raise ValueError(
            "JVP_CELERY_VISIBILITY_TIMEOUT_S "
            f"({settings.celery_visibility_timeout_s:g}) must be longer than "
            f"JVP_CELERY_TASK_TIMEOUT_S ({settings.celery_task_timeout_s:g}): a chunk still "
            "computing would be handed to a second worker"
        )
    app = Celery("jvp", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.celery_queue,
        task_serializer="json",
        accept_content=["json"],  # ids only; never pickle
        task_ignore_result=True,  # results go to the job store
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,  # `jvp-service worker-ping`
    )
    app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # The store was unreachable: try again later, from the start of the chunk.
        autoretry_for=(OperationalError,),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=20,
    )(run_chunk)
    return app


def ranges_of(idxs: list[int]) -> list[list[int]]:
    """Sorted indices as [start, stop) ranges: [0, 1, 2, 5] -> [[0, 3], [5, 6]]."""
    out: list[list[int]] = []
    for i in idxs:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


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
        import torch

        from app.engine.worker import Engine
        from app.main import build_registry, select_devices
        from app.service import JVPService

        s = self.settings
        if s.num_threads:
            torch.set_num_threads(s.num_threads)
        engine = Engine(select_devices(s.device), max_queue=s.max_queue)
        service = JVPService(s, engine, build_registry(s))
        engine.start()
        log.info(
            "worker %s: engine ready on %s",
            self.worker_id,
            ", ".join(str(d) for d in engine.devices),
        )
        return service

    def compute(self, specs: list[TaskSpec]) -> list[_Finished]:
        """Prepare each task as /jvp would, submit them all at BATCH priority (together, so
        the dynamic batcher can stack them), and wait for them, at most the task timeout."""
        from app.engine.errors import DeadlineExceeded, EngineError
        from app.engine.worker import BATCH
        from app.jobs.models import DONE, FAILED
        from app.jobs.operations import prepare_spec
        from app.jobs.runner import _Finished, error_of

        service = self.service()
        finished: list[_Finished] = []
        submitted: list[tuple[TaskSpec, JVPTask, Future[JVPResult]]] = []
        for spec in specs:
            try:
                task = prepare_spec(service, spec)
                future = service.engine.submit(task, priority=BATCH)
            except Exception as e:  # noqa: BLE001 - recorded for the task; the job goes on
                if not isinstance(e, EngineError):
                    log.exception("jobs: task %s/%d failed unexpectedly", spec.job_id, spec.idx)
                finished.append(_Finished(spec, FAILED, error=error_of(e)))
                continue
            submitted.append((spec, task, future))
        timeout = self.settings.celery_task_timeout_s
        deadline = time.monotonic() + timeout
        for spec, task, future in submitted:
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                future.cancel()
                error = DeadlineExceeded(f"The task did not finish within {timeout:g} s")
                finished.append(_Finished(spec, FAILED, error=error_of(error)))
            except Exception as e:  # noqa: BLE001 - the task's own error
                if not isinstance(e, EngineError):
                    log.error("jobs: task %s/%d failed unexpectedly: %r", spec.job_id, spec.idx, e)
                finished.append(_Finished(spec, FAILED, error=error_of(e)))
            else:
                finished.append(_Finished(spec, DONE, task=task, result=result))
        return finished


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def runtime() -> WorkerRuntime:
    """This process's runtime (a forked child never reuses its parent's)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(Settings())
        return _runtime


def run_chunk(self: Task, job_id: str, ranges: list[list[int]]) -> dict[str, int]:
    """Compute the tasks of `ranges` of job `job_id` that have not ended (NOTE [celery
    delivery]); returns counts for the worker log."""
    from app.jobs.models import CANCELLED, FAILED
    from app.jobs.store import Outcome

    rt = runtime()
    limit = rt.settings.max_task_attempts
    idxs = [i for start, stop in ranges for i in range(start, stop)]
    attempt = rt.store.start_attempt(job_id, idxs, worker=rt.worker_id, max_attempts=limit)
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
        if rt.settings.celery_task_delay_s:
            time.sleep(rt.settings.celery_task_delay_s)  # test hook (JVP_CELERY_TASK_DELAY_S)
        finished = rt.compute(attempt.run)
        rt.store.record([f.outcome() for f in finished])
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


def worker_main(device: str | None, concurrency: int, log_level: str) -> int:
    """`jvp-service worker`: a Celery worker that owns the device workers of its machine.

    With --device (or JVP_DEVICE other than auto) one worker process computes on those
    devices. Without, one worker process per GPU (each `--device cuda:N`, each its own
    Celery worker, supervised here), or one on the CPU when there is none. A worker
    process never touches CUDA before its pool forks (a forked child could not use it):
    GPUs are counted through NVML, and GPU workers run as fresh processes."""
    settings = Settings()
    if device is None and settings.device == "auto":
        gpus = _gpu_count()
        if gpus:
            return _supervise([f"cuda:{i}" for i in range(gpus)], concurrency, log_level)
        device = "cpu"
    devices = device or settings.device
    if device is not None and device != "cpu":
        devices = f"{device},cpu"  # tasks may still ask for the CPU
    os.environ["JVP_DEVICE"] = devices  # what the pool children's Settings() read
    settings = Settings()
    from app.jobs.store import JobStore

    store = JobStore(settings.database_url)  # tables at head before the first chunk
    try:
        store.migrate()
    finally:
        store.close()
    app = make_celery(settings)
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


__all__ = ["TASK_NAME", "WorkerRuntime", "make_celery", "ranges_of", "run_chunk"]
