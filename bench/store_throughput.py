"""What the PostgreSQL job store can take: tasks/s through a worker's two transactions per
chunk (the start, `JobStore.start_attempt`; the results, `JobStore.record`), no compute.

    .venv/bin/python bench/store_throughput.py [--tasks 20000] [--chunk 125] [--writers 1,2,4]

Needs this machine's PostgreSQL (127.0.0.1:5432, db test). Makes a fresh schema, stores a
job of --tasks tasks like bench/celery_throughput.py's (`sin(x) * y + x**2` on 64 float32:
four 64-element inputs, results of two 64-element tensors), then for each writer count
that many threads (each its own connection, as each worker has) take the job's chunks
from a shared list: start the chunk, write its results (blobs made beforehand, so only
the store is timed). Prints tasks/s per writer count: the job store's ceiling for this
kind of task, which bench/README.md's capacity model divides by a worker's tasks/s.
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from sqlalchemy import create_engine, text

from app.jobs import blobs
from app.jobs.service import batch_key
from app.jobs.store import JobStore, NewJob, NewTask, Outcome
from app.jobs.tables import DONE

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
EXPRESSION = "sin(x) * y + x**2"


@contextmanager
def schema() -> Iterator[str]:
    name = f"jvp_store_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{PG}?options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


def make_job(tasks: int) -> NewJob:
    g = torch.Generator().manual_seed(0)
    job = NewJob(expression=EXPRESSION, model=None, options={"encoding": "b64"}, tasks=[])
    for i in range(tasks):
        x, y, tx, ty = (torch.randn(64, generator=g) for _ in range(4))
        inputs = blobs.dump_inputs({"primals": {"x": x, "y": y}, "tangents": {"x": tx, "y": ty}})
        key = batch_key(EXPRESSION, None, job.options, inputs)
        job.tasks.append(NewTask(idx=i, inputs=inputs, batch_key=key))
    return job


def run(url: str, tasks: int, chunk: int, writers: int) -> float:
    """Seconds for `writers` threads to start and finish every chunk of a fresh job."""
    store = JobStore(url)
    job, _ = store.create_job(make_job(tasks))
    result = blobs.dump_result(
        (torch.randn(64),), (torch.randn(64),), single=True, method="forward", names=None
    )
    work: queue.Queue[list[int]] = queue.Queue()
    for start in range(0, tasks, chunk):
        work.put(list(range(start, min(tasks, start + chunk))))

    def writer(n: int) -> None:
        own = JobStore(url)  # a worker's own connection pool
        worker = f"bench:{n}"
        try:
            while True:
                try:
                    idxs = work.get_nowait()
                except queue.Empty:
                    return
                attempt = own.start_attempt(job.id, idxs, worker=worker, max_attempts=3, lease_s=60)
                outcomes = [Outcome(job.id, s.idx, DONE, result=result) for s in attempt.run]
                own.record(outcomes, worker=worker)
        finally:
            own.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    view = store.get_job(job.id)
    assert (view.status, view.done) == ("completed", tasks), view
    store.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=125)
    parser.add_argument("--writers", default="1,2,4")
    args = parser.parse_args()
    rows = []
    with schema() as url:
        JobStore(url).migrate()
        for writers in (int(w) for w in args.writers.split(",")):
            seconds = run(url, args.tasks, args.chunk, writers)
            rows.append((writers, seconds, args.tasks / seconds))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nJob store (PostgreSQL) throughput, {args.tasks} tasks in chunks of {args.chunk}, "
        f"start + results per chunk, {os.cpu_count()} CPUs, load average {load}:\n"
    )
    print("| writers | seconds | tasks/s |")
    print("| ------- | ------- | ------- |")
    for writers, seconds, rate in rows:
        print(f"| {writers} | {seconds:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
