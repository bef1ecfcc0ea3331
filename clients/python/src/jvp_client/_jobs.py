"""Batch jobs: a handle on one job of ``POST /jobs`` (API.md, "Batch jobs")."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._base import OutputKind, job_path
from ._types import JobInfo, JobResultsPage, JobTaskResult

if TYPE_CHECKING:
    from ._client import AsyncJVPClient, JVPClient

__all__ = ["AsyncJob", "Job"]

DEFAULT_POLL_INTERVAL_S = 1.0
DEFAULT_PAGE_SIZE = 100


class _Progress:
    """A tqdm bar of done/total tasks with the failure count; ETA from tqdm's rate."""

    def __init__(self, job_id: str, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc=f"job {job_id}", unit="task", dynamic_ncols=True)

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


def _timeout_error(info: JobInfo, timeout_s: float) -> TimeoutError:
    return TimeoutError(
        f"Job {info.id} did not finish within {timeout_s:g} s "
        f"(status {info.status}, {info.done}/{info.total} tasks done, {info.failed} failed)"
    )


def _check_wait_args(poll_interval_s: float, timeout_s: float | None) -> None:
    if not poll_interval_s > 0:
        raise ValueError(f"wait(): expected poll_interval_s > 0, got {poll_interval_s!r}")
    if timeout_s is not None and timeout_s < 0:
        raise ValueError(f"wait(): expected timeout_s >= 0 or None, got {timeout_s!r}")


def _check_page_args(offset: int, page_size: int) -> None:
    if offset < 0:
        raise ValueError(f"results(): expected offset >= 0, got {offset}")
    if page_size < 1:
        raise ValueError(f"results(): expected page_size >= 1, got {page_size}")


C = TypeVar("C")


class _JobHandle(Generic[C]):
    """What :class:`Job` and :class:`AsyncJob` share: the client, the state last seen."""

    def __init__(
        self,
        client: C,
        info: JobInfo,
        *,
        kind: OutputKind | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self._client = client
        self.info = info
        self._kind = kind or OutputKind()
        self.idempotency_key = idempotency_key

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        i = self.info
        return (
            f"{type(self).__name__}(id={i.id!r}, status={i.status!r}, "
            f"done={i.done}/{i.total}, failed={i.failed})"
        )


class Job(_JobHandle["JVPClient"]):
    """A batch job. ``info`` is the state last seen; :meth:`status` asks again.

    Results come back in task order as numpy arrays (torch tensors when the job
    was submitted with torch tensors).
    """

    _client: JVPClient

    def status(self) -> JobInfo:
        """``GET /jobs/{id}``: the job's current state."""
        response = self._client._request("GET", job_path(self.id))
        self.info = self._client._parse_job(response)
        return self.info

    def wait(
        self,
        *,
        progress: bool = False,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        timeout_s: float | None = None,
    ) -> JobInfo:
        """Poll until the job is completed or cancelled; returns its final state.

        Args:
            progress: show a tqdm bar (done/total tasks, failures, ETA) on stderr.
            poll_interval_s: seconds between two polls.
            timeout_s: raise ``TimeoutError`` when the job is still running after this long.
        """
        _check_wait_args(poll_interval_s, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _Progress(self.id, enabled=progress)
        try:
            while True:
                info = self.status()
                bar.update(info)
                if info.finished:
                    return info
                if deadline is not None and time.monotonic() >= deadline:
                    raise _timeout_error(info, timeout_s or 0.0)
                self._client._sleep(poll_interval_s)
        finally:
            bar.close()

    def pages(
        self, *, offset: int = 0, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[JobResultsPage]:
        """``GET /jobs/{id}/results`` page after page, following ``next_offset``."""
        _check_page_args(offset, page_size)
        next_offset: int | None = offset
        while next_offset is not None:
            response = self._client._request(
                "GET",
                f"{job_path(self.id)}/results",
                params={"offset": next_offset, "limit": page_size},
            )
            page = self._client._parse_results_page(response, self._kind)
            yield page
            if page.next_offset is not None and page.next_offset <= next_offset:
                break  # a server that does not move forward would loop forever
            next_offset = page.next_offset

    def results(
        self, *, offset: int = 0, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[JobTaskResult]:
        """Every task's result in task order (fetched a page at a time)."""
        for page in self.pages(offset=offset, page_size=page_size):
            yield from page.results

    def cancel(self) -> JobInfo:
        """``DELETE /jobs/{id}``: tasks not yet started never run. Returns the job's state."""
        response = self._client._request("DELETE", job_path(self.id))
        info = self._client._parse_job_if_any(response)
        if info is None:
            return self.status()
        self.info = info
        return info


class AsyncJob(_JobHandle["AsyncJVPClient"]):
    """The async twin of :class:`Job`: the same methods, awaited; results is an async iterator."""

    _client: AsyncJVPClient

    async def status(self) -> JobInfo:
        """``GET /jobs/{id}``: the job's current state."""
        response = await self._client._request("GET", job_path(self.id))
        self.info = self._client._parse_job(response)
        return self.info

    async def wait(
        self,
        *,
        progress: bool = False,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        timeout_s: float | None = None,
    ) -> JobInfo:
        """Poll until the job is completed or cancelled; see :meth:`Job.wait`."""
        _check_wait_args(poll_interval_s, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _Progress(self.id, enabled=progress)
        try:
            while True:
                info = await self.status()
                bar.update(info)
                if info.finished:
                    return info
                if deadline is not None and time.monotonic() >= deadline:
                    raise _timeout_error(info, timeout_s or 0.0)
                await self._client._sleep(poll_interval_s)
        finally:
            bar.close()

    async def pages(
        self, *, offset: int = 0, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[JobResultsPage]:
        """``GET /jobs/{id}/results`` page after page, following ``next_offset``."""
        _check_page_args(offset, page_size)
        next_offset: int | None = offset
        while next_offset is not None:
            response = await self._client._request(
                "GET",
                f"{job_path(self.id)}/results",
                params={"offset": next_offset, "limit": page_size},
            )
            page = self._client._parse_results_page(response, self._kind)
            yield page
            if page.next_offset is not None and page.next_offset <= next_offset:
                break
            next_offset = page.next_offset

    async def results(
        self, *, offset: int = 0, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[JobTaskResult]:
        """Every task's result in task order (fetched a page at a time)."""
        async for page in self.pages(offset=offset, page_size=page_size):
            for result in page.results:
                yield result

    async def cancel(self) -> JobInfo:
        """``DELETE /jobs/{id}``: tasks not yet started never run. Returns the job's state."""
        response = await self._client._request("DELETE", job_path(self.id))
        info = self._client._parse_job_if_any(response)
        if info is None:
            return await self.status()
        self.info = info
        return info
