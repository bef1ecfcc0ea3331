"""The API's side of the Celery backend (`JVP_JOBS_BACKEND=celery`): send stored jobs'
task ids to the broker. No task is computed in the API process.

`submit` hands the job id to a dispatcher thread (the route has answered 202 by then: the
job is committed). The dispatcher reads the job's queued tasks (index and batch key),
groups those that share a key (same function, options and shapes) into chunks (of
JVP_CELERY_CHUNK_SIZE, or sized by the job: NOTE [chunk size]) in task order, sends one
message per chunk, then marks the job dispatched. An API process that dies between
storing a job and marking it leaves it undispatched: every API process sends such jobs at
start, and looks for old ones now and then (so a job is never lost; a chunk sent twice is
computed once, NOTE [celery delivery]).

The same thread takes back, every quarter of JVP_CELERY_LEASE_S, the running tasks whose
worker stopped renewing their lease, and sends them again (NOTE [task leases] in
app/jobs/leases.py).

Cancelling needs nothing from the broker: `JobStore.cancel` ends the queued tasks, and a
worker skips a task that has ended.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta

from celery import Celery

from app.jobs.celery_config import TASK_NAME, make_celery, ranges_of
from app.jobs.leases import RECLAIM_BATCH, reclaim_lapsed
from app.jobs.store import JobStore, now
from app.settings import Settings

log = logging.getLogger("app.jobs.celery")

# Look for undispatched jobs this often, older than the grace (younger ones may still be in
# another API process's hands). A job sent twice costs only messages (a task started or
# ended is skipped), so the grace is short enough that a job whose API process died
# mid-dispatch is sent again within 25 s.
SWEEP_INTERVAL_S = 5.0
SWEEP_GRACE_S = 20.0

_STOP = object()


AUTO_CHUNKS = 16  # chunks per job with JVP_CELERY_CHUNK_SIZE=0, within the bounds below
AUTO_MIN, AUTO_MAX = 16, 512
AUTO_MAX_BYTES = 32 << 20  # inputs of one chunk (a worker holds a chunk's tensors at once)


def chunk_size(setting: int, tasks: int, input_bytes: int) -> int:
    """Tasks per chunk: `setting` when positive, else sized by the job.

    # NOTE [chunk size]
    A chunk costs a broker message and two store transactions (the start, the results)
    whatever its size; measured here (bench/README.md "Where a worker's time goes") that
    fixed cost is about 15-30 ms, against about 1 ms per small task computed, so chunks
    of 16 spent more time in the store than in the engine. A 16th of the job keeps a
    second (third, ...) worker busy until the last chunk and the tail of a job, where one
    worker finishes its last chunk while the others idle, at a 16th; 512 bounds what a
    lost worker takes with it, and 32 MiB what a chunk's tensors take of its memory.
    (Since the store's statements are cached and tiny tasks compute stacked, the fixed
    cost is about 5 ms and a small task about 0.2 ms in all: 250-task chunks made one and
    two workers faster on a 2,000-task job, 3,271 and 4,048 against 3,041 and 3,667 tasks/s,
    but 8 chunks would leave a third worker and more with one each, all tail; bench/README.md
    "A worker's time per task cut by 60%".)"""
    if setting > 0:
        return setting
    size = min(AUTO_MAX, max(AUTO_MIN, -(-tasks // AUTO_CHUNKS)))
    if tasks and input_bytes:
        size = min(size, max(1, AUTO_MAX_BYTES * tasks // input_bytes))
    return size


def chunks(plan: list[tuple[int, str | None]], size: int) -> list[list[int]]:
    """Task indices grouped by batch key, each group cut in chunks of `size`, in the order of
    each chunk's first task."""
    groups: dict[str | None, list[int]] = defaultdict(list)
    for idx, key in plan:
        groups[key].append(idx)
    out = [idxs[i : i + size] for idxs in groups.values() for i in range(0, len(idxs), size)]
    return sorted(out, key=lambda c: c[0])


class CeleryBackend:
    """A `JobBackend` that sends task ids to Celery workers (app/jobs/celery_app.py)."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.celery: Celery = make_celery(settings)
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jobs-dispatcher", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        return None  # the store ends the queued tasks; workers skip ended tasks

    # -- the dispatcher thread -----------------------------------------------------------

    def _run(self) -> None:
        self._sweep(created_before=None)  # whatever a dead API process left behind
        reclaim_every = self.settings.celery_lease_s / 4
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        next_reclaim = time.monotonic()
        while True:
            wait = max(0.0, min(next_sweep, next_reclaim) - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, str):
                self._dispatch_logged(item)
            if time.monotonic() >= next_reclaim:
                next_reclaim = time.monotonic() + reclaim_every
                self._reclaim()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                self._sweep(created_before=now() - timedelta(seconds=SWEEP_GRACE_S))

    def _reclaim(self) -> None:
        try:
            while reclaim_lapsed(self.store, self.send) >= RECLAIM_BATCH:
                pass
        except Exception:  # noqa: BLE001 - the store or broker is down: tried again soon
            log.exception("jobs: taking back tasks whose lease lapsed failed")

    def _sweep(self, *, created_before: datetime | None) -> None:
        try:
            ids = self.store.undispatched(created_before=created_before)
        except Exception:  # noqa: BLE001 - the store is down: the next sweep tries again
            log.exception("jobs: looking for undispatched jobs failed")
            return
        for job_id in ids:
            self._dispatch_logged(job_id)

    def _dispatch_logged(self, job_id: str) -> None:
        try:
            self.dispatch(job_id)
        except Exception:  # noqa: BLE001 - left undispatched: a later sweep sends it
            log.exception("jobs: sending job %s to the broker failed; retried later", job_id)

    def dispatch(self, job_id: str) -> int:
        """Send the job's queued tasks in chunks, then mark it dispatched. Returns chunks sent."""
        plan = self.store.dispatch_plan(job_id)
        size = chunk_size(
            self.settings.celery_chunk_size, len(plan), self.store.input_bytes(job_id)
        )
        sent = self.send(job_id, plan, size)
        self.store.mark_dispatched(job_id)
        log.info("jobs: job %s sent to the broker: %d tasks in %d chunks", job_id, len(plan), sent)
        return sent

    def send(self, job_id: str, plan: list[tuple[int, str | None]], size: int = 0) -> int:
        """Send tasks (index, batch key) of a job in chunks of `size` (0: sized by the plan
        alone, NOTE [chunk size]). Returns how many chunks."""
        size = size or chunk_size(self.settings.celery_chunk_size, len(plan), 0)
        parts = chunks(plan, size)
        with self.celery.producer_or_acquire() as producer:
            for part in parts:
                self.celery.send_task(
                    TASK_NAME,
                    args=(job_id, ranges_of(part)),
                    queue=self.settings.celery_queue,
                    producer=producer,
                )
                if self.settings.celery_dispatch_delay_s:  # test hook
                    time.sleep(self.settings.celery_dispatch_delay_s)
        return len(parts)
