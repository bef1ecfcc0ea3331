"""Batch jobs: a handle on one job of ``POST /jobs`` (API.md, "Batch jobs").

The handles' methods are plans (NOTE [plans] in ``_plans.py``), written once here
for :class:`Job` and :class:`AsyncJob`; a handle reaches the service through the
client it was made by, typed by the Protocols ``SyncRunner`` / ``AsyncRunner``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from . import _parsing as parsing
from ._base import NOT_GIVEN, Encoding, Limits, OutputKind, TimeoutTypes, job_path
from ._bodies import job_request
from ._operations import Handles
from ._plans import (
    AsyncRunner,
    Call,
    Emit,
    Handle,
    Plan,
    Sleep,
    SyncRunner,
    async_iterator,
    async_method,
    gather,
    sync_iterator,
    sync_method,
)
from ._stacking import JobArrays, OnError, stack_results
from ._types import JobInfo, JobResultsPage, JobTaskResult

__all__ = ["AsyncJob", "Job"]

DEFAULT_POLL_INTERVAL_S = 1.0
MAX_WAIT_S = 60.0  # the longest the service holds a GET /jobs/{id}?wait_s=
WAIT_MARGIN_S = 30.0  # a waiting GET's timeout: wait_s and this
DEFAULT_PAGE_SIZE = 100


class _Progress:
    """A tqdm bar (``tqdm.auto``: a widget in notebooks) of done/total tasks with the
    failure count; ETA from tqdm's rate. The total is known from the first frame."""

    def __init__(self, info: JobInfo, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                desc=f"job {info.id}",
                total=info.total,
                initial=info.done,
                unit="task",
                dynamic_ncols=True,
            )

    def update(self, info: JobInfo) -> None:
        bar = self._bar
        if bar is None:
            return
        if bar.total != info.total:
            bar.total = info.total
        bar.set_postfix_str(f"failed={info.failed}, {info.status}", refresh=False)
        if info.done > bar.n:
            bar.update(info.done - bar.n)
        else:
            bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_page_args(offset: int, page_size: int) -> None:
    if offset < 0:
        raise ValueError(f"results(): expected offset >= 0, got {offset}")
    if page_size < 1:
        raise ValueError(f"results(): expected page_size >= 1, got {page_size}")


C = TypeVar("C")
Jb = TypeVar("Jb")


class _JobHandle(Handle[C, JobInfo]):
    """What :class:`Job` and :class:`AsyncJob` share: the client, the state last seen."""

    def __init__(
        self,
        client: C,
        info: JobInfo,
        *,
        kind: OutputKind | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        super().__init__(client, info, kind)
        self.idempotency_key = idempotency_key

    def __repr__(self) -> str:
        i = self.info
        return (
            f"{type(self).__name__}(id={i.id!r}, status={i.status!r}, "
            f"done={i.done}/{i.total}, failed={i.failed})"
        )


# -- plans --------------------------------------------------------------------------------


def status(job: _JobHandle[Any], *, wait_s: float = 0.0) -> Plan[JobInfo]:
    """``GET /jobs/{id}``: the job's current state; with ``wait_s``, once it has finished
    or after ``wait_s`` seconds (at most MAX_WAIT_S), whichever comes first."""
    if wait_s <= 0:
        response = yield Call("GET", job_path(job.id))
    else:
        wait_s = min(wait_s, MAX_WAIT_S)
        response = yield Call(
            "GET", job_path(job.id), params={"wait_s": wait_s}, timeout=wait_s + WAIT_MARGIN_S
        )
    job.info = parsing.parse(response, "job", JobInfo.from_json)
    return job.info


def wait(
    job: _JobHandle[Any],
    *,
    progress: bool = False,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    timeout_s: float | None = None,
) -> Plan[JobInfo]:
    """Wait until the job is completed or cancelled; returns its final state.

    Each poll asks the service to answer as soon as the job finishes
    (``GET /jobs/{id}?wait_s=``), so ``wait`` returns at the job's end, not at the next
    poll; a service that answers at once is polled every ``poll_interval_s``.

    Args:
        progress: show a tqdm bar (done/total tasks, failures, ETA) on stderr, or a
            widget in a notebook (``tqdm.auto``).
        poll_interval_s: seconds between two polls (and the progress bar's updates).
        timeout_s: raise ``TimeoutError`` when the job is still running after this long.
    """
    if not poll_interval_s > 0:
        raise ValueError(f"wait(): expected poll_interval_s > 0, got {poll_interval_s!r}")
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"wait(): expected timeout_s >= 0 or None, got {timeout_s!r}")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    bar = _Progress(job.info, enabled=progress)
    try:
        while True:
            asked = time.monotonic()
            wait_s = poll_interval_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - asked)
            info = yield from status(job, wait_s=wait_s)
            bar.update(info)
            if info.finished:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Job {info.id} did not finish within {timeout_s:g} s (status {info.status}, "
                    f"{info.done}/{info.total} tasks done, {info.failed} failed)"
                )
            left = poll_interval_s - (time.monotonic() - asked)
            if left > 0:  # the service answered before wait_s: it does not wait
                yield Sleep(left)
    finally:
        bar.close()


def _result_pages(
    job: _JobHandle[Any], offset: int, page_size: int, *, each: bool = False
) -> Plan[None]:
    """``GET /jobs/{id}/results`` page after page, following ``next_offset``; emits the
    pages, or (``each``) the results they hold, in task order."""
    _check_page_args(offset, page_size)
    next_offset: int | None = offset
    while next_offset is not None:
        params = {"offset": next_offset, "limit": page_size}
        response = yield Call("GET", f"{job_path(job.id)}/results", params=params)
        page = parsing.parse(response, "job results", parsing.read_results_page(job._kind))
        for item in page.results if each else [page]:
            yield Emit(item)
        if page.next_offset is not None and page.next_offset <= next_offset:
            break  # a server that does not move forward would loop forever
        next_offset = page.next_offset


def pages(
    job: _JobHandle[Any], *, offset: int = 0, page_size: int = DEFAULT_PAGE_SIZE
) -> Plan[None]:
    """``GET /jobs/{id}/results`` page after page, following ``next_offset``."""
    return _result_pages(job, offset, page_size)


def results(
    job: _JobHandle[Any], *, offset: int = 0, page_size: int = DEFAULT_PAGE_SIZE
) -> Plan[None]:
    """Every task's result in task order (fetched a page at a time)."""
    return _result_pages(job, offset, page_size, each=True)


def results_array(
    job: _JobHandle[Any], *, on_error: OnError = "raise", page_size: int = DEFAULT_PAGE_SIZE
) -> Plan[JobArrays]:
    """Every task's result stacked into arrays: ``output`` and ``jvp`` with a leading
    task dimension (row i is task ``index[i]``); see :func:`stack_results`.

    Args:
        on_error: ``"raise"`` (default): a failed task is a ValueError naming it;
            ``"skip"``: the failed tasks are left out (``errors`` holds them).
        page_size: results per request.
    """
    collected = yield from gather(_result_pages(job, 0, page_size, each=True))
    return stack_results(collected, on_error=on_error)


def cancel(job: _JobHandle[Any]) -> Plan[JobInfo]:
    """``DELETE /jobs/{id}``: tasks not yet started never run. Returns the job's state."""
    response = yield Call("DELETE", job_path(job.id))
    if not parsing.is_job(parsing.json_or_none(response)):
        return (yield from status(job))
    job.info = parsing.parse(response, "job", JobInfo.from_json)
    return job.info


# -- job plans of the clients (bound in _client.py) ------------------------------------


def submit_job(
    client: Handles[Any, Jb],
    tasks: Iterable[Mapping[str, Any]],
    *,
    expression: str | None = None,
    model: str | None = None,
    dtype: object = None,
    device: str | None = None,
    engine: str | None = None,
    fallback: str | None = None,
    encoding: Encoding = "auto",
    options: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    timeout: TimeoutTypes = NOT_GIVEN,
) -> Plan[Jb]:
    """``POST /jobs``: run many JVPs as one batch job.

    ``tasks`` are ``{"primals": ..., "tangents": ..., "parameter_tangents": ...}``
    mappings (with tensors as for :meth:`jvp`), each of which may override the
    job-wide ``expression``/``model`` and ``options``. One ``Idempotency-Key``
    (``idempotency_key``, or a new random one) is sent with every attempt, so a
    retried submission returns the same job.
    """
    key = idempotency_key or f"jvp-{uuid.uuid4().hex}"
    call, kind = job_request(
        client,
        tasks,
        expression=expression,
        model=model,
        dtype=dtype,
        encoding=encoding,
        options={"dtype": True, "device": device, "engine": engine, "fallback": fallback},
        extra_options=options,
        headers={"Idempotency-Key": key},
        timeout=timeout,
    )
    response = yield call
    return client._job(parsing.parse(response, "job", JobInfo.from_json), kind, key)


def get_job(client: Handles[Any, Jb], job_id: str, *, as_torch: bool = False) -> Plan[Jb]:
    """``GET /jobs/{id}``: a handle on an existing job (``as_torch``: torch results)."""
    response = yield Call("GET", job_path(job_id))
    return client._job(
        parsing.parse(response, "job", JobInfo.from_json), OutputKind(as_torch=as_torch), None
    )


def _jobs_call(offset: int, limit: int, status: str | None) -> Call:
    params: dict[str, Any] = {"offset": offset, "limit": limit}
    if status is not None:
        params["status"] = status
    return Call("GET", "jobs", params=params)


def list_jobs(
    client: Limits, *, offset: int = 0, limit: int = 20, status: str | None = None
) -> Plan[list[JobInfo]]:
    """``GET /jobs``: jobs, newest first, one page; ``status``: only the jobs in that
    status (``"queued"``, ``"running"``, ``"completed"``, ``"cancelled"``).
    :meth:`iter_jobs` follows the pages."""
    response = yield _jobs_call(offset, limit, status)
    jobs, _ = parsing.parse(response, "/jobs", parsing.read_jobs_page)
    return jobs


def iter_jobs(status: str | None = None, page_size: int = 100) -> Plan[None]:
    """Every job (of ``status``), newest first, fetching page after page."""
    if page_size < 1:
        raise ValueError(f"iter_jobs(): expected page_size >= 1, got {page_size}")
    offset: int | None = 0
    while offset is not None:
        response = yield _jobs_call(offset, page_size, status)
        jobs, next_offset = parsing.parse(response, "/jobs", parsing.read_jobs_page)
        for job in jobs:
            yield Emit(job)
        if next_offset is not None and next_offset <= offset:
            break  # a server that does not move forward would loop forever
        offset = next_offset


# -- handles ------------------------------------------------------------------------------


class Job(_JobHandle[SyncRunner]):
    """A batch job. ``info`` is the state last seen; :meth:`status` asks again.

    Results come back in task order as numpy arrays (torch tensors when the job
    was submitted with torch tensors); :meth:`results_array` stacks them.
    """

    status = sync_method(status)
    wait = sync_method(wait)
    results_array = sync_method(results_array)
    cancel = sync_method(cancel)
    pages = sync_iterator(pages, JobResultsPage)
    results = sync_iterator(results, JobTaskResult)


class AsyncJob(_JobHandle[AsyncRunner]):
    """The async twin of :class:`Job`: the same methods, awaited; results is an async iterator."""

    status = async_method(status)
    wait = async_method(wait)
    results_array = async_method(results_array)
    cancel = async_method(cancel)
    pages = async_iterator(pages, JobResultsPage)
    results = async_iterator(results, JobTaskResult)
