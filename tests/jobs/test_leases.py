"""Leases on running tasks (NOTE [task leases]), on SQLite and PostgreSQL: a held task is
not started twice, a lapsed one is taken back and sent again, a worker that lost its
tasks writes none of them; and how a job is cut in chunks (NOTE [chunk size])."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from app.jobs import blobs, leases
from app.jobs.celery_backend import chunk_size
from app.jobs.leases import LeaseKeeper, local_worker_dead, reclaim_lapsed, renew
from app.jobs.store import JobStore, NewJob, NewTask, Outcome
from app.jobs.tables import DONE, QUEUED, RUNNING

A, B = "host-a:101", "host-b:202"


def _job(store: JobStore, n: int) -> str:
    tasks = [
        NewTask(
            idx=i,
            inputs=blobs.dump_inputs({"primals": {"x": torch.tensor([float(i)])}}),
            batch_key="k",
        )
        for i in range(n)
    ]
    job, _ = store.create_job(NewJob(expression="x * 2", model=None, options={}, tasks=tasks))
    return job.id


def _done(job_id: str, idx: int, value: float) -> Outcome:
    t = torch.tensor([value], dtype=torch.float64)
    blob = blobs.dump_result((t,), (t,), single=True, method="forward")
    return Outcome(job_id, idx, DONE, result=blob)


def _start(store: JobStore, job_id: str, idxs: list[int], worker: str, lease_s: float) -> list[int]:
    attempt = store.start_attempt(job_id, idxs, worker=worker, max_attempts=3, lease_s=lease_s)
    return [spec.idx for spec in attempt.run]


def test_held_tasks_start_once_lapsed_ones_again(store: JobStore) -> None:
    job_id = _job(store, 4)
    assert _start(store, job_id, [0, 1], A, lease_s=60) == [0, 1]
    assert _start(store, job_id, [0, 1, 2], B, lease_s=60) == [2]  # 0 and 1: A holds them
    assert _start(store, job_id, [2], A, lease_s=0.2) == []
    time.sleep(0.3)
    assert _start(store, job_id, [2], A, lease_s=0.2) == []  # B's lease is still good
    assert _start(store, job_id, [0], B, lease_s=60) == []
    assert store.task_counts(job_id) == {RUNNING: 3, QUEUED: 1}


def test_renewal_keeps_lease_and_only_holder_renews(store: JobStore) -> None:
    job_id = _job(store, 2)
    _start(store, job_id, [0, 1], A, lease_s=0.5)
    assert renew(store, job_id, [0, 1], worker=B, lease_s=60) == 0
    assert renew(store, job_id, [0, 1], worker=A, lease_s=60) == 2
    time.sleep(0.6)  # past the first lease, within the renewed one
    assert _start(store, job_id, [0, 1], B, lease_s=60) == []


def test_reclaim_lapsed_requeues_and_sends_once(store: JobStore) -> None:
    job_id = _job(store, 5)
    _start(store, job_id, [0, 1, 2], A, lease_s=0.2)
    _start(store, job_id, [3], B, lease_s=60)
    sent: list[tuple[str, list[tuple[int, str | None]]]] = []
    assert reclaim_lapsed(store, lambda j, plan: sent.append((j, plan))) == 0
    time.sleep(0.3)
    assert reclaim_lapsed(store, lambda j, plan: sent.append((j, plan))) == 3
    assert sent == [(job_id, [(0, "k"), (1, "k"), (2, "k")])]
    assert reclaim_lapsed(store, lambda j, plan: sent.append((j, plan))) == 0  # once
    assert store.task_counts(job_id) == {QUEUED: 4, RUNNING: 1}
    assert _start(store, job_id, [0, 1, 2, 3], B, lease_s=60) == [0, 1, 2]


def test_reclaim_sends_nothing_when_send_fails(store: JobStore) -> None:
    job_id = _job(store, 2)
    _start(store, job_id, [0, 1], A, lease_s=0.1)
    time.sleep(0.2)

    def broken(job: str, plan: list[tuple[int, str | None]]) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        reclaim_lapsed(store, broken)
    assert store.task_counts(job_id) == {RUNNING: 2}  # still lapsed: taken next time
    assert reclaim_lapsed(store, lambda j, plan: None) == 2


def test_worker_that_lost_its_tasks_writes_none(store: JobStore) -> None:
    job_id = _job(store, 2)
    _start(store, job_id, [0, 1], A, lease_s=0.1)
    time.sleep(0.2)
    assert _start(store, job_id, [0, 1], B, lease_s=60) == [0, 1]  # A was presumed lost
    assert store.record([_done(job_id, 0, 1.0), _done(job_id, 1, 1.0)], worker=A) == 0
    assert store.record([_done(job_id, 0, 2.0), _done(job_id, 1, 2.0)], worker=B) == 2
    assert store.record([_done(job_id, 0, 3.0)], worker=B) == 0  # ended: written once
    job, tasks = store.results(job_id, offset=0, limit=10)
    assert (job.status, job.done, job.failed) == ("completed", 2, 0)
    assert [blobs.load_result(t.result).outputs[0].item() for t in tasks if t.result] == [2.0, 2.0]


def test_dead_worker_of_this_host_frees_its_tasks(store: JobStore) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    dead, alive = f"{host}:{child.pid}", f"{host}:{os.getpid()}"
    assert local_worker_dead(dead)
    assert not local_worker_dead(f"{host}:{os.getppid()}")
    assert not local_worker_dead(f"elsewhere:{child.pid}")  # another machine: not known
    assert not local_worker_dead(None)
    job_id = _job(store, 1)
    _start(store, job_id, [0], dead, lease_s=60)
    attempt = store.start_attempt(
        job_id, [0], worker=alive, max_attempts=3, lease_s=60, is_dead=local_worker_dead
    )
    assert [s.idx for s in attempt.run] == [0]


def test_lease_keeper_renews_while_the_block_runs(store: JobStore) -> None:
    job_id = _job(store, 1)
    _start(store, job_id, [0], A, lease_s=2.0)
    with LeaseKeeper(store, job_id, [0], worker=A, lease_s=2.0):
        time.sleep(3.0)  # past the first lease: renewed every 0.5 s
        assert _start(store, job_id, [0], B, lease_s=60) == []
    time.sleep(2.1)  # no longer renewed
    assert _start(store, job_id, [0], B, lease_s=60) == [0]


def test_lease_keeper_writes_solve_progress_that_get_job_reads(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOTE [progress across processes], on both databases."""
    monkeypatch.setattr(leases, "PROGRESS_INTERVAL_S", 0.05)
    job_id = _job(store, 4)
    assert _start(store, job_id, [0, 1, 2], A, lease_s=60) == [0, 1, 2]
    counts = {0: 3}
    with LeaseKeeper(store, job_id, [0, 1, 2], worker=A, lease_s=60, progress=counts.get):
        deadline = time.monotonic() + 10
        while store.get_job(job_id).progress != {0: 3} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get_job(job_id).progress == {0: 3}
        counts.update({0: 7, 2: 1})
        while store.get_job(job_id).progress != {0: 7, 2: 1} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get_job(job_id).progress == {0: 7, 2: 1}
    # Only the worker holding a running task writes its count; an ended task shows none.
    leases.write_progress(store, job_id, {1: 5, 3: 9}, worker=B)
    assert store.get_job(job_id).progress == {0: 7, 2: 1}
    store.record([_done(job_id, 0, 1.0)], worker=A)
    assert store.get_job(job_id).progress == {2: 1}


def test_a_chunk_with_gaps_starts_renews_and_writes_only_its_own_tasks(store: JobStore) -> None:
    """NOTE [runs of indices]: BETWEEN alone only for a run; a chunk with gaps (tasks of two
    batch keys interleaved) keeps its IN list, on both databases."""
    job_id = _job(store, 8)
    assert _start(store, job_id, [1, 3, 6], A, lease_s=60) == [1, 3, 6]
    assert _start(store, job_id, [2, 3, 4, 5], B, lease_s=60) == [2, 4, 5]  # 3 is A's
    assert renew(store, job_id, [1, 3, 6], worker=A, lease_s=60) == 3
    assert renew(store, job_id, [1, 2, 3], worker=A, lease_s=60) == 2  # 2 is B's
    written = store.record([_done(job_id, i, float(i)) for i in (1, 2, 6)], worker=A)
    assert written == 2  # 1 and 6; 2 is B's
    job = store.get_job(job_id)
    assert (job.done, job.status) == (2, "running")


def test_chunk_size_by_job() -> None:
    assert chunk_size(7, 2000, 10**9) == 7  # set: as set
    assert chunk_size(0, 96, 0) == 16  # at least 16
    assert chunk_size(0, 2000, 2000 * 1000) == 125  # a 16th
    assert chunk_size(0, 100_000, 0) == 512  # at most 512
    assert chunk_size(0, 2000, 2000 * (1 << 20)) == 32  # at most 32 MiB of inputs
    assert chunk_size(0, 10, 10 * (64 << 20)) == 1
