"""The in-process job runner: feeds stored tasks to the device workers at BATCH priority.

A feeder claims queued tasks from the store (at most `JVP_JOB_CONCURRENCY` in flight),
each task is validated by `JVPService.prepare` exactly like a /jvp request and queued
on its device worker at `BATCH` priority, behind every interactive request (a worker
runs one item at a time, so a /jvp request waits at most for the batch task computing
now). Outcomes are written back in small batches, one transaction each
(NOTE [durable jobs] in app/jobs/store.py). A task's error is stored for that task and
the job goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

from app.engine.batching import work_key
from app.engine.errors import EngineError, Overloaded
from app.engine.task import BATCH, JVPResult, JVPTask
from app.jobs.execute import Error, Finished, prepare, task_error
from app.jobs.store import JobStore, TaskSpec
from app.jobs.tables import CANCELLED, DONE, FAILED, QUEUED
from app.services.jvp import JVPService

log = logging.getLogger(__name__)

Prepared = tuple[TaskSpec, JVPTask | None, Error | None]
# A claimed task prepared (or its error), and its result when computed at the claim.
Claimed = tuple[TaskSpec, JVPTask | None, Error | None, JVPResult | None]


def _work(claimed: Prepared) -> tuple[str, Hashable | None] | None:
    """Claimed tasks with one key may compute together: same job, same work (`work_key`)."""
    spec, task, _ = claimed
    return None if task is None else (spec.job_id, work_key(task))


FLUSH_INTERVAL_S = 0.1  # outcomes wait at most this long before their transaction
FLUSH_BATCH = 256
IDLE_POLL_S = 1.0  # look for new work this often when idle (jobs from other processes)
PURGE_INTERVAL_S = 60.0


class LocalRunner:
    """Runs job tasks in this process on the engine's device workers (a `JobBackend`).

    The event loop only queues work and routes completions; claiming and preparing a
    batch of tasks is one thread hop, and serializing and writing a batch of outcomes is
    another, so the per-task cost on the loop is small.
    """

    def __init__(
        self,
        store: JobStore,
        service: JVPService,
        *,
        concurrency: int,
        retention_s: float,
    ) -> None:
        self.store = store
        self.service = service
        self.concurrency = concurrency
        self.retention_s = retention_s
        self._cancelled: set[str] = set()
        # Claimed and not ended: None while being prepared, else its worker future.
        self._inflight: dict[tuple[str, int], Future[JVPResult] | None] = {}
        self._waiting: list[tuple[TaskSpec, JVPTask]] = []  # prepared; the queue was full
        self._pending: list[Finished] = []
        self._wake = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._idle = asyncio.Event()
        self._stopping = False
        self._feeder: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.completed = 0  # tasks this runner computed to an end (a result or an error)

    @property
    def inflight(self) -> int:
        """Tasks claimed and not yet ended (being prepared, queued on a worker, computing)."""
        return len(self._inflight)

    # -- JobBackend ----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        requeued = await asyncio.to_thread(self.store.recover)
        if requeued:
            log.warning("jobs: %d interrupted tasks are queued again", requeued)
        self._feeder = asyncio.create_task(self._feed(), name="jobs-feeder")
        self._flusher = asyncio.create_task(self._flush_loop(), name="jobs-flusher")

    async def stop(self) -> None:
        """Stop claiming; tasks still waiting in a device queue go back to the store's queue;
        the one computing now finishes and its result is written."""
        self._stopping = True
        self._wake.set()
        if self._feeder is not None:
            await self._feeder
        for spec, _ in self._waiting:
            self._end(spec, QUEUED)
        self._waiting.clear()
        for future in list(self._inflight.values()):
            if future is not None:
                future.cancel()  # its callback puts the task back in the queue
        if self._inflight:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 30)
        self._flush_now.set()
        if self._flusher is not None:
            await self._flusher
        await self._write_pending()

    def submit(self, job_id: str) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)
        for (jid, _), future in list(self._inflight.items()):
            if jid == job_id and future is not None:
                future.cancel()  # a task still queued on its worker never runs
        kept = []
        for spec, task in self._waiting:
            if spec.job_id == job_id:
                self._end(spec, CANCELLED)
            else:
                kept.append((spec, task))
        self._waiting = kept

    # -- the loops -----------------------------------------------------------------------

    async def _feed(self) -> None:
        next_purge = time.monotonic()
        while not self._stopping:
            try:
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_INTERVAL_S
                    while await asyncio.to_thread(self.store.purge, self.retention_s):
                        pass
                if self._waiting:
                    waiting, self._waiting = self._waiting, []
                    for spec, task in waiting:
                        self._enqueue(spec, task)
                    if self._waiting:  # still full: wait for the queue to drain a little
                        await asyncio.sleep(0.05)
                        continue
                free = self.concurrency - len(self._inflight)
                # Refill once half the slots are free: one claim transaction per many tasks.
                if free * 2 >= self.concurrency:
                    prepared = await asyncio.to_thread(self._claim, free, tuple(self._cancelled))
                    for spec, _, _, _ in prepared:
                        self._inflight[(spec.job_id, spec.idx)] = None
                    for spec, prepared_task, error, result in prepared:
                        if prepared_task is None:
                            self._end(spec, FAILED, error=error)
                        elif result is not None:
                            self._end(spec, DONE, task=prepared_task, result=result)
                        else:
                            self._enqueue(spec, prepared_task)
                    if prepared:
                        continue
            except Exception:  # noqa: BLE001 - a store hiccup must not end the runner
                log.exception("jobs: claiming tasks failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)

    def _claim(self, limit: int, skip: tuple[str, ...]) -> list[Claimed]:
        """Claim tasks and prepare each exactly as /jvp would (worker thread); tiny tasks of
        one work claimed together are computed here, as one stacked JVP
        (`Engine.run_together`, as a Celery worker does with a chunk)."""
        specs = self.store.claim(limit, skip_jobs=skip)
        claimed = [(spec, *prepare(self.service, spec)) for spec in specs]
        out: list[Claimed] = []
        for work, group in itertools.groupby(claimed, key=_work):
            run = list(group)
            results: list[JVPResult | None] = [None] * len(run)
            if work is not None:  # prepared tasks of one work (None: their errors)
                tasks = [task for _, task, _ in run if task is not None]
                with contextlib.suppress(EngineError):  # the engine not ready: queue them
                    results = list(self.service.engine.run_together(tasks) or results)
            out += [(*c, result) for c, result in zip(run, results, strict=True)]
        return out

    def _enqueue(self, spec: TaskSpec, task: JVPTask) -> None:
        key = (spec.job_id, spec.idx)
        if spec.job_id in self._cancelled:
            self._end(spec, CANCELLED)
            return
        try:
            future = self.service.engine.submit(task, priority=BATCH)
        except Overloaded:  # the device queue is full or the engine not ready: retry
            self._waiting.append((spec, task))
            return
        except EngineError as e:
            self._end(spec, FAILED, error=task_error(spec, e))
            return
        self._inflight[key] = future
        loop = self._loop
        assert loop is not None
        future.add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._completed, spec, task, f)
        )

    def _completed(self, spec: TaskSpec, task: JVPTask, future: Future[JVPResult]) -> None:
        """On the event loop, once a task's worker future is resolved or cancelled."""
        if future.cancelled():
            self._end(spec, CANCELLED if spec.job_id in self._cancelled else QUEUED)
            return
        error = future.exception()
        if error is None:
            self._end(spec, DONE, task=task, result=future.result())
        else:
            self._end(spec, FAILED, error=task_error(spec, error))

    def _end(self, spec: TaskSpec, kind: str, **kw: Any) -> None:
        self._inflight.pop((spec.job_id, spec.idx), None)
        self._pending.append(Finished(spec, kind, **kw))
        if kind in (DONE, FAILED):
            self.completed += 1
        if len(self._pending) >= FLUSH_BATCH:
            self._flush_now.set()
        if not self._inflight:
            self._idle.set()
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), FLUSH_INTERVAL_S)
            self._flush_now.clear()
            if self._pending:
                try:
                    await self._write_pending()
                except Exception:  # noqa: BLE001 - kept pending, written on the next round
                    log.exception("jobs: writing task outcomes failed; retrying")
                    await asyncio.sleep(0.5)
            if self._stopping and not self._inflight:
                return

    async def _write_pending(self) -> None:
        # Swapped on the event loop, the only thread that appends to it.
        batch, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self._write, batch)
        except BaseException:
            self._pending[:0] = batch
            raise

    def _write(self, batch: list[Finished]) -> None:
        self.store.record([f.outcome() for f in batch])
        metrics = self.service.metrics
        if metrics is not None:  # counted once written, so a crash never counts a task twice
            for kind in (DONE, FAILED, CANCELLED):
                ended = sum(1 for f in batch if f.kind == kind)
                if ended:
                    metrics.job_task_ended(kind, ended)
